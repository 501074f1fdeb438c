"""MODEL specs -> a local HF model folder: `builtin:NAME`, a local folder (never touches the network), a GGUF file,
or a hub id.

Whatever the spec, the folder returned loads with plain `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`: remote-code families with an exact native mapping come back as their cached native
conversion (models/families), the others only with `trust_remote_code=True`; a `.gguf` file, or a folder holding one
and no config.json, comes back as its cached native conversion (models/gguf).
"""

from __future__ import annotations

import re
from pathlib import Path

from lowtune.errors import UserError
from lowtune.models.builtin import builtin_path, is_builtin
from lowtune.models.gguf import gguf_in_folder, is_gguf_file, is_gguf_name, native_gguf_folder
from lowtune.runs import ADAPTER_CONFIG, RunFolder, close_name_hint, is_adapter_dir, is_run_folder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# `models/NAME` is the tutorial's download folder, never a hub id ("models" is no owner on either hub)
LOCAL_FOLDER = "models/"
# where the tutorial's folders come from (ModelScope ids, as the tutorial downloads them)
TUTORIAL_MODELS = {"internlm-chat-7b": "Shanghai_AI_Laboratory/internlm-chat-7b",
                   "internlm-7b": "Shanghai_AI_Laboratory/internlm-7b"}


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", LOCAL_FOLDER)) and not is_gguf_name(spec)


def missing_folder_error(spec: str) -> UserError:
    """A `models/NAME` folder that is not there yet: say how to download it."""
    path = Path(spec)
    if close_name_hint(path):  # a folder with a name like it is there: most likely a typo
        return _missing_local_folder(path)
    source = f"{TUTORIAL_MODELS[path.name]} --hub modelscope" if path.name in TUTORIAL_MODELS else "OWNER/NAME"
    return UserError(f"model folder not found: {spec} (relative to {Path.cwd()}); download it first: "
                     f"lowtune download {source} -o {spec}, or give another folder or hub id")


def resolve_model_dir(spec: str, hub: str = "auto", revision: str | None = None,
                      trust_remote_code: bool = False) -> Path:
    """A local folder holding config.json + weights + tokenizer for `spec`."""
    if is_builtin(spec):
        return builtin_path(spec)
    path = Path(spec).expanduser()
    if is_gguf_file(path):
        return native_gguf_folder(path)
    if path.is_dir():
        return _prepared(path, trust_remote_code)
    check_not_mistyped(spec)
    if is_hub_id(spec):
        from lowtune.models.download import download  # network only for hub ids

        return _prepared(download(spec, hub=hub, revision=revision), trust_remote_code)
    if is_gguf_name(spec):
        raise UserError(f"GGUF file not found: {spec} (relative to {Path.cwd()})"
                        f"{close_name_hint(path, folders_only=False)}")
    if spec.startswith(LOCAL_FOLDER):
        raise missing_folder_error(spec)
    raise UserError(f"model not found: '{spec}' is neither a local folder, a .gguf file nor a hub id like owner/name "
                    "(or builtin:tiny)")


def check_not_mistyped(spec: str) -> None:
    """A file other than a GGUF, or `runs/medqaa` next to `runs/medqa`, is a local mistake: say so before any hub is
    asked."""
    path = Path(spec).expanduser()
    if path.is_file() and not is_gguf_file(path):
        raise UserError(f"{spec} is a file; give a model folder (config.json + weights), a .gguf file, a hub id or "
                        "builtin:tiny")
    if is_hub_id(spec) and _holds_models(path.parent):
        raise _missing_local_folder(path)


def _holds_models(folder: Path) -> bool:
    """A local folder of models, runs or adapters (`runs/`, `merged/`), as opposed to a hub owner's name that
    happens to exist here (a cloned repo, a hub cache)."""
    markers = ("config.json", "config.yaml", ADAPTER_CONFIG)
    return folder != Path(".") and folder.is_dir() and any(
        (child / marker).is_file() for child in folder.iterdir() if child.is_dir() for marker in markers)


def _missing_local_folder(path: Path) -> UserError:
    """`runs/medqaa` when `runs/` is here: a mistyped local path, not a hub id (the hubs would only fail later)."""
    return UserError(f"model folder not found: {path} (relative to {Path.cwd()}){close_name_hint(path)}")


def _prepared(path: Path, trust_remote_code: bool) -> Path:
    if is_run_folder(path):
        base = RunFolder(path).load_config().model.path
        raise UserError(f"{path} is a run folder, not a model: its base is {base}; use that, or merge the run first "
                        f"(lowtune merge {path} -o merged/{path.name}) and give merged/{path.name}")
    if is_adapter_dir(path) and not (path / "config.json").is_file():
        raise UserError(f"{path} is a LoRA adapter, not a model; merge it first (lowtune merge {path} -o "
                        "merged/NAME) and give merged/NAME")
    if not (path / "config.json").is_file():
        gguf = gguf_in_folder(path)
        if gguf is not None:
            return native_gguf_folder(gguf)
        raise UserError(f"{path} has no config.json: give a Hugging Face model folder "
                        "(lowtune download ID -o DIR fetches one) or a .gguf file")
    from lowtune.models.families import prepare

    return prepare(path, trust_remote_code=trust_remote_code)

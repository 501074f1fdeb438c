"""`lowtune merge`: fold a LoRA/QLoRA adapter into a full-precision copy of its base and write a standard HF folder.

The base is always reloaded unquantised (bf16/fp16/fp32) on CPU, never merged into 4-bit weights: a QLoRA adapter
was trained against dequantised NF4 weights, and rounding the merged sum back to 4 bits would throw the update away.
peft's `merge_and_unload` adds each layer's B@A in place (peak memory ≈ one copy of the model in the chosen dtype);
`save_pretrained` then writes safetensors shards of at most `max_shard_size`. The output is written to a temporary
folder beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError
from lowtune.export.card import card_for_run, write_card, write_modelscope_configuration
from lowtune.models.load import load_model
from lowtune.models.resolve import resolve_model_dir
from lowtune.runs import (ADAPTER_CONFIG, GENERATION_CONFIG, Located, is_adapter_dir, is_run_folder, locate_folder,
                          missing_folder, read_adapter_config, read_stop_ids, staged_dir)
from lowtune.templates import FAMILY_TEMPLATES, STOP_WORDS, ChatTemplate, resolve_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MERGEABLE = {"LORA", "ADALORA", "LOHA", "LOKR", "IA3"}
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
SHARD_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KIB|MIB|GIB)$", re.I)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")


@dataclass
class MergeResult:
    out_dir: Path
    dtype: str
    shards: int
    stop_ids: list[int]
    seconds: float


# --- what to merge ------------------------------------------------------------------------------------------------

def find_source(target: str, base: str | None = None) -> Located:
    """RUN or ADAPTER -> the adapter folder, its base model spec (`base` wins), the run's config/template/stop ids."""
    path = Path(target).expanduser()
    if not path.exists():
        raise missing_folder(path)
    if not (is_run_folder(path) or is_adapter_dir(path)):
        raise UserError(f"{target} is neither a run folder (config.yaml) nor a PEFT adapter folder "
                        f"({ADAPTER_CONFIG}); give one of them")
    found = locate_folder(path)
    if found.weights is None:
        raise UserError(f"{path} has no adapter yet (no adapter/ and no complete checkpoint); train it first")
    if found.kind == "model":
        raise UserError(f"{path} is a full fine-tune: {found.weights} is already a complete model "
                        "(nothing to merge); use that folder directly")
    adapter_cfg = read_adapter_config(found.weights)
    if str(adapter_cfg.get("peft_type", "")).upper() not in MERGEABLE:
        raise UserError(f"{found.weights} holds a {adapter_cfg.get('peft_type')} adapter, which has no weights to "
                        f"merge; merge supports {', '.join(sorted(MERGEABLE))}")
    return replace(found, base_spec=base or found.base_spec or "")


def resolve_base(source: Located) -> Path:
    """The local base folder; a missing one is a user error that names --base."""
    if not source.base_spec:
        raise UserError(f"adapter {source.weights} does not name its base model; give --base PATH")
    hub = source.config.model.hub if source.config else "auto"
    revision = source.config.model.revision if source.config else None
    try:
        base_dir = resolve_model_dir(source.base_spec, hub=hub, revision=revision,
                                     trust_remote_code=bool(source.config and source.config.model.trust_remote_code))
    except UserError as exc:
        raise UserError(f"the base model '{source.base_spec}' of {source.weights} was not found ({exc}); "
                        "give --base PATH") from None
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise UserError(f"{base_dir} stores quantised weights (quantization_config in config.json); merging needs "
                        "the full-precision base: give --base PATH")
    return base_dir


# --- merging ------------------------------------------------------------------------------------------------------

def choose_dtype(name: str, base_dir: Path) -> str:
    """'auto' = the dtype the base is stored in (config.json), fp16 when it does not say."""
    if name in ("bf16", "fp16", "fp32"):
        return name
    if name != "auto":
        raise UserError(f"--dtype must be bf16, fp16, fp32 or auto (got '{name}')")
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    stored = config.get("dtype") or config.get("torch_dtype") or ""
    return DTYPE_NAMES.get(str(stored), "fp16")


def check_shard_size(size: str) -> str:
    if not SHARD_SIZE.match(size.strip()):
        raise UserError(f"--max-shard-size {size!r} must look like 2GB, 500MB or 4GiB")
    return size.strip().upper()


def merge_template(source: Located, tokenizer: PreTrainedTokenizerBase, base_dir: Path) -> ChatTemplate:
    """The template the adapter was trained with: the run's file, else the adapter's, else the config/auto one."""
    name = source.config.model.template if source.config else "auto"
    family = FAMILY_TEMPLATES.get(json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
                                  .get("model_type", ""), "")
    stop_words = STOP_WORDS.get(name, ()) or STOP_WORDS.get(family, ())
    if source.template_path is not None:
        return ChatTemplate(name=name, source=source.template_path.read_text(encoding="utf-8"), stop_words=stop_words)
    return resolve_template(name, tokenizer, base_dir, stop_words=stop_words)


def all_stop_ids(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase, *sources: list[int]) -> list[int]:
    ids = template.stop_token_ids(tokenizer)
    for extra in sources:
        ids += [i for i in extra if i not in ids]
    return ids


def merged_model(source: Located, base_dir: Path, dtype: str) -> Any:
    """Base in `dtype` on CPU + adapter, merged and unwrapped into a plain transformers model."""
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    trust = bool(source.config and source.config.model.trust_remote_code)
    hf_logging.disable_progress_bar()
    base = load_model(base_dir, quantization="none", dtype=dtype, device="cpu", trust_remote_code=trust)
    try:
        with warnings.catch_warnings():  # peft still asks transformers for a renamed attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(source.weights))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"adapter {source.weights} does not fit base {base_dir} "
                        f"({str(exc).splitlines()[0]}); give the base it was trained on with --base PATH") from None
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training turns it off; generation wants it
    return merged.eval()


def _save_tokenizer(source: Located, base_dir: Path, out: Path) -> tuple[Any, ChatTemplate]:
    from transformers import AutoTokenizer

    folder = source.tokenizer_dir or base_dir
    trust = bool(source.config and source.config.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    template = merge_template(source, tokenizer, base_dir)
    tokenizer.chat_template = template.source  # so plain apply_chat_template renders the training template
    tokenizer.save_pretrained(out)
    return tokenizer, template


def _copy_base_extras(base_dir: Path, out: Path) -> None:
    """License files, and remote-code modules when the saved config still points at them."""
    for name in LICENSE_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    if "auto_map" in json.loads((out / "config.json").read_text(encoding="utf-8")):
        for module in base_dir.glob("*.py"):
            if not (out / module.name).exists():
                shutil.copy2(module, out / module.name)


def write_merged(source: Located, base_dir: Path, tmp: Path, dtype: str, max_shard_size: str) -> list[int]:
    model = merged_model(source, base_dir, dtype)
    tokenizer, template = _save_tokenizer(source, base_dir, tmp)
    stop_ids = all_stop_ids(template, tokenizer, source.stop_ids, read_stop_ids(base_dir / GENERATION_CONFIG))
    model.generation_config.eos_token_id = stop_ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else stop_ids[0]
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    del model
    _copy_base_extras(base_dir, tmp)
    title = source.config.output.dir if source.config and source.config.output.dir else source.weights.name
    write_card(tmp, card_for_run(Path(title).name, source.config, base_dir, stop_ids=stop_ids,
                                 base_spec=source.base_spec))
    write_modelscope_configuration(tmp)
    return stop_ids


def merge(target: str, out_dir: str | Path, base: str | None = None, dtype: str = "auto",
          max_shard_size: str = "2GB", force: bool = False) -> MergeResult:
    """Merge RUN|ADAPTER into a full model folder at `out_dir` (atomic: all of it appears, or nothing)."""
    started = time.perf_counter()
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} already exists and is not empty; choose another -o or add --force")
    max_shard_size = check_shard_size(max_shard_size)
    source = find_source(target, base)
    base_dir = resolve_base(source)
    dtype = choose_dtype(dtype, base_dir)
    with staged_dir(out) as tmp:
        stop_ids = write_merged(source, base_dir, tmp, dtype, max_shard_size)
    shards = len(list(out.glob("*.safetensors")))
    return MergeResult(out_dir=out, dtype=dtype, shards=shards, stop_ids=stop_ids,
                       seconds=time.perf_counter() - started)

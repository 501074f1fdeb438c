"""Model families: which checkpoints load natively as they are, which convert once into a native folder, and which
need their own remote code.

`prepare(folder, trust_remote_code)` is the one entry point: it returns a folder that plain
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` open without remote code, converting
InternLM v1, InternLM2/2.5, Qwen v1 and Baichuan/Baichuan2 (RoPE sizes) once into `$LOWTUNE_HOME/native/`. A
family with no exact native mapping (ChatGLM2/3, Baichuan ALiBi sizes, Qwen v1 with partial rotary, ...) is
returned as it is only with `trust_remote_code`, otherwise a one-line error says what to do.

To add a family: subclass `base.Family` in a module here and list an instance in `FAMILIES`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowtune.errors import UserError
from lowtune.models.families.base import MARKER, Family, native_folder, read_config
from lowtune.models.families.baichuan import Baichuan
from lowtune.models.families.internlm import InternLM
from lowtune.models.families.internlm2 import InternLM2
from lowtune.models.families.qwen import QwenV1
from lowtune.models.families.remote import REMOTE_ONLY

FAMILIES: list[Family] = [InternLM(), InternLM2(), QwenV1(), Baichuan()]


def cache_root() -> Path:
    base = os.environ.get("LOWTUNE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "lowtune")
    return Path(base) / "native"


def family_for(config: dict, folder: Path) -> Family | None:
    return next((f for f in FAMILIES if f.matches(config, folder)), None)


def _remote_error(folder: Path, what: str, reason: str, needs: str) -> UserError:
    return UserError(f"{folder}: {what} has no exact native mapping in lowtune ({reason}); load it with its own "
                     f"code by adding --trust-remote-code (model.trust_remote_code: true); that code was written "
                     f"for {needs}, so use an environment with that version")


def prepare(folder: Path, trust_remote_code: bool = False) -> Path:
    """A folder ordinary transformers loading accepts: the original, or its cached native conversion."""
    config = read_config(folder)
    if config.get(MARKER):
        return folder  # already native (a conversion, or a merge of one)
    family = family_for(config, folder)
    if family is not None:
        reason = family.not_exact(config, folder)
        if reason is None:
            return native_folder(family, folder, cache_root())
        if trust_remote_code:
            return folder
        raise _remote_error(folder, family.name, reason, family.remote_needs)
    model_type = config.get("model_type", "")
    if model_type in REMOTE_ONLY:
        if trust_remote_code:
            return folder
        what, reason, needs = REMOTE_ONLY[model_type]
        raise _remote_error(folder, what, reason, needs)
    if config.get("auto_map") and not _is_native_type(model_type):
        if trust_remote_code:
            return folder
        raise UserError(f"{folder}: model_type '{model_type}' exists only as remote code; add --trust-remote-code "
                        "(model.trust_remote_code: true) if you trust that code")
    if not _is_native_type(model_type):
        raise UserError(f"{folder}/config.json: model_type '{model_type}' is unknown to transformers and lowtune; "
                        "check the folder or upgrade transformers")
    return folder


def _is_native_type(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING

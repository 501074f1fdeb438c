"""MODEL specs -> a local HF model folder: `builtin:NAME`, a local folder (never touches the network), or a hub id.

Whatever the spec, the folder returned loads with plain `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`: remote-code families with an exact native mapping come back as their cached native
conversion (models/families), the others only with `trust_remote_code=True`.
"""

from __future__ import annotations

import re
from pathlib import Path

from lowtune.errors import UserError
from lowtune.models.builtin import builtin_path, is_builtin

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(spec: str, hub: str = "auto", revision: str | None = None,
                      trust_remote_code: bool = False) -> Path:
    """A local folder holding config.json + weights + tokenizer for `spec`."""
    if is_builtin(spec):
        return builtin_path(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _prepared(path, trust_remote_code)
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):
        from lowtune.models.download import download  # network only for hub ids

        return _prepared(download(spec, hub=hub, revision=revision), trust_remote_code)
    raise UserError(f"model not found: '{spec}' is neither a local folder nor a hub id like owner/name "
                    "(or builtin:tiny)")


def _prepared(path: Path, trust_remote_code: bool) -> Path:
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: give a Hugging Face model folder "
                        "(lowtune download ID -o DIR fetches one)")
    from lowtune.models.families import prepare

    return prepare(path, trust_remote_code=trust_remote_code)

"""InternLM v1 (internlm-7b, internlm-chat-7b, internlm-chat-20b) -> Llama with attention biases.

The published remote code (`modeling_internlm.py`) is Llama's layer with `bias=config.bias` on q/k/v/o (true for
7B, false for 20B), the same tensor names, and a rotary embedding set by `config.rotary`: `{"type": "origin"}` is
plain RoPE with `base`, `{"type": "dynamic"}` is dynamic NTK: past `max_position_embeddings` the base becomes
`base * (f * L / max_pos - (f - 1)) ** (dim / (dim - 2))` for a sequence of length L (f = `scaling_factor`, default
1), which is transformers' `rope_type: dynamic` with `factor: f`. Older configs without `rotary` use plain RoPE with
`rope_theta` (default 10000). Tokenizer: the SentencePiece model with `<eoh>`/`<eoa>` as user-defined pieces.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lowtune.errors import UserError
from lowtune.models.families.base import Family, llama_config, sentencepiece_model
from lowtune.models.families.spm import load_proto, save_native_tokenizer

STOP_PIECES = ("<eoa>",)


def rope_parameters(config: dict) -> dict:
    rotary = config.get("rotary")
    if not rotary:
        return {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    kind = rotary.get("type", "origin")
    base = float(rotary.get("base", 10000.0))
    if kind == "origin":
        return {"rope_type": "default", "rope_theta": base}
    if kind == "dynamic":
        return {"rope_type": "dynamic", "rope_theta": base, "factor": float(rotary.get("scaling_factor", 1.0))}
    raise UserError(f"config.json: rotary.type '{kind}' is not one InternLM's code knows (origin or dynamic)")


def spm_stop_ids(model_file: Path, pieces: tuple[str, ...]) -> list[int]:
    ids = {p.piece: i for i, p in enumerate(load_proto(model_file).pieces)}
    return [ids[p] for p in pieces if p in ids]


class InternLM(Family):
    """InternLM v1 (remote code): a Llama with biased attention projections; its tensors keep Llama's names."""

    name = "internlm"
    model_types = ("internlm",)

    def native_config(self, config: dict, folder: Path) -> Any:
        return llama_config(config, rope_parameters(config), attention_bias=bool(config.get("bias", True)))

    def map_tensor(self, name: str, tensor, config: dict) -> Iterable[tuple[str, Any]]:
        if name.endswith("rotary_emb.inv_freq"):
            return []  # a buffer older remote code saved; the native model computes it
        return [(name, tensor)]

    def write_tokenizer(self, folder: Path, out_dir: Path, config: dict) -> list[int]:
        model_file = write_spm_tokenizer(folder, out_dir, "InternLM", prepend="first", add_bos=True)
        return spm_stop_ids(model_file, STOP_PIECES)


def write_spm_tokenizer(folder: Path, out_dir: Path, family: str, prepend: str, add_bos: bool, **extra: Any) -> Path:
    """The checkpoint's SentencePiece tokenizer as a native one in `out_dir` (its tokenizer_config.json decides
    BOS/EOS where it says); returns the tokenizer.model it read."""
    model_file = sentencepiece_model(folder, family)
    source = tokenizer_config_of(folder)
    save_native_tokenizer(model_file, out_dir, special_map(source), prepend=prepend,
                          add_bos=source.get("add_bos_token", add_bos),
                          add_eos=source.get("add_eos_token", False), **extra)
    return model_file


def tokenizer_config_of(folder: Path) -> dict:
    import json

    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def special_map(source: dict) -> dict:
    """bos/eos/unk/pad and the chat template of the original tokenizer_config, as plain strings."""
    def text(value):
        return value.get("content") if isinstance(value, dict) else value

    out = {k: text(source[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if source.get(k)}
    out.setdefault("bos_token", "<s>")
    out.setdefault("eos_token", "</s>")
    out.setdefault("unk_token", "<unk>")
    if source.get("chat_template"):
        out["chat_template"] = source["chat_template"]
    return out

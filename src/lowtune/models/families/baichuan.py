"""Baichuan-7B and Baichuan2-7B -> Llama: packed `W_pack` splits into q/k/v; Baichuan2's NormHead is normalised once.

Published layout (`modeling_baichuan.py`, 7B sizes): Llama names except `self_attn.W_pack` (hidden -> 3*hidden,
q, k, v in that order, no bias), RoPE with base 10000. Baichuan2's head is a `NormHead`: at inference it multiplies
by the row-normalised weight (`F.normalize(weight)`), so writing the normalised rows into a plain `lm_head` gives the
same logits. In training the original renormalises every step; with the head frozen (LoRA/QLoRA) that is the same,
a full fine-tune that updates the head trains a plain head from there on. The 13B sizes use ALiBi attention
instead of RoPE, which no transformers Llama-style class has, so they load only through their remote code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lowtune.models.families.base import Family, llama_config, qkv_entries
from lowtune.models.families.internlm import write_spm_tokenizer

BAICHUAN2_VOCAB = 125696


def _modeling_source(folder: Path) -> str:
    path = folder / "modeling_baichuan.py"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def uses_alibi(config: dict, folder: Path) -> bool:
    source = _modeling_source(folder)
    if source:
        return "alibi" in source.lower()
    return "max_position_embeddings" not in config  # the 13B configs only carry model_max_length


def has_norm_head(config: dict, folder: Path) -> bool:
    source = _modeling_source(folder)
    if source:
        return "NormHead" in source
    return config.get("vocab_size") == BAICHUAN2_VOCAB


class Baichuan(Family):
    name = "baichuan"
    model_types = ("baichuan",)
    remote_needs = "transformers 4.29-4.33 (its tokenizer fails from 4.34)"

    def not_exact(self, config: dict, folder: Path) -> str | None:
        if uses_alibi(config, folder):
            return "the 13B models use ALiBi attention instead of rotary embeddings"
        return None

    def native_config(self, config: dict, folder: Path) -> Any:
        return llama_config(config, {"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
                            max_positions=4096)

    def marker(self, config: dict, folder: Path) -> str:
        return "baichuan2" if has_norm_head(config, folder) else "baichuan"

    def map_tensor(self, name: str, tensor, config: dict) -> Iterable[tuple[str, Any]]:
        if name.endswith("self_attn.W_pack.weight"):
            base = name[: -len("W_pack.weight")]
            q, k, v = tensor.chunk(3, dim=0)
            return qkv_entries(base, ".weight", q, k, v)
        if name == "lm_head.weight" and has_norm_head(config, Path(config["_lowtune_folder"])):
            import torch

            return [(name, torch.nn.functional.normalize(tensor.float(), dim=-1).to(tensor.dtype))]
        if name.endswith("rotary_emb.inv_freq"):
            return []
        return [(name, tensor)]

    def write_tokenizer(self, folder: Path, out_dir: Path, config: dict) -> list[int]:
        write_spm_tokenizer(folder, out_dir, "Baichuan", prepend="always", add_bos=False)
        return []

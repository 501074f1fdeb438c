"""InternLM2 / InternLM2.5 -> Llama: packed `wqkv` split per KV group, renamed blocks, same RoPE.

Published layout (`modeling_internlm2.py`): `model.tok_embeddings`, per layer `attention.wqkv` (rows grouped as
[kv_head][q_0 .. q_{g-1}, k, v][head_dim], g = heads / kv_heads), `attention.wo`, `feed_forward.w1/w3/w2`
(gate/up/down), `attention_norm`, `ffn_norm`, then `model.norm` and `output`. Query head h*g+j uses KV head h,
which is exactly how transformers' repeat_kv pairs heads, so the split is exact. `rope_scaling`
{type: linear|dynamic, factor} maps to transformers' rope types of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lowtune.errors import UserError
from lowtune.models.families.base import Family, llama_config, qkv_entries
from lowtune.models.families.internlm import spm_stop_ids, tokenizer_config_of, write_spm_tokenizer

RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "model.norm.weight": "model.norm.weight",
}
LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
STOP_PIECES = ("<|im_end|>",)


def split_wqkv(tensor, config: dict) -> tuple[Any, Any, Any]:
    """q, k, v rows of a packed wqkv weight (out x in) or bias (out)."""
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    groups = heads // kv
    packed = tensor.reshape(kv, groups + 2, head_dim, *tensor.shape[1:])
    rest = tensor.shape[1:]
    q = packed[:, :groups].reshape(heads * head_dim, *rest)
    k = packed[:, groups].reshape(kv * head_dim, *rest)
    v = packed[:, groups + 1].reshape(kv * head_dim, *rest)
    return q, k, v


def rope_parameters(config: dict) -> dict:
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind not in ("linear", "dynamic"):
        raise UserError(f"config.json: rope_scaling.type '{kind}' is not one InternLM2's code knows")
    return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}


class InternLM2(Family):
    """InternLM2 / 2.5 (remote code): packed `wqkv` split into q/k/v per KV group, blocks renamed to Llama's,
    GQA kept."""

    name = "internlm2"
    model_types = ("internlm2",)

    def native_config(self, config: dict, folder: Path) -> Any:
        return llama_config(config, rope_parameters(config), attention_bias=bool(config.get("bias", False)))

    def map_tensor(self, name: str, tensor, config: dict) -> Iterable[tuple[str, Any]]:
        if name in RENAMES:
            return [(RENAMES[name], tensor)]
        prefix, _, rest = name.partition(".layers.")
        index, _, leaf = rest.partition(".")
        base = f"model.layers.{index}"
        if leaf.startswith("attention.wqkv."):
            kind = leaf.rsplit(".", 1)[1]
            q, k, v = split_wqkv(tensor, config)
            return qkv_entries(f"{base}.self_attn.", f".{kind}", q, k, v)
        for old, new in LAYER_RENAMES.items():
            if leaf.startswith(old + "."):
                return [(f"{base}.{new}{leaf[len(old):]}", tensor)]
        if leaf.endswith("rotary_emb.inv_freq"):
            return []
        raise UserError(f"unexpected InternLM2 tensor '{name}'; is this an InternLM2 checkpoint?")

    def write_tokenizer(self, folder: Path, out_dir: Path, config: dict) -> list[int]:
        source = tokenizer_config_of(folder)
        added = {int(i): (t["content"] if isinstance(t, dict) else t)
                 for i, t in (source.get("added_tokens_decoder") or {}).items()}
        special = {(t["content"] if isinstance(t, dict) else t)
                   for t in (source.get("added_tokens_decoder") or {}).values()
                   if not isinstance(t, dict) or t.get("special", True)}
        model_file = write_spm_tokenizer(folder, out_dir, "InternLM2", prepend="always", add_bos=True,
                                         extra_added=added, special=special)
        return spm_stop_ids(model_file, STOP_PIECES)

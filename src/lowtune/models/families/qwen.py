"""Qwen v1 (Qwen-7B/14B(-Chat), Qwen-1_8B) -> Qwen2: `c_attn` splits into biased q/k/v, MLP halves renamed.

Published layout (`modeling_qwen.py`): `transformer.wte`, per block `ln_1`, `attn.c_attn` (hidden -> 3*hidden with
bias; q, k, v in that order), `attn.c_proj` (no bias), `ln_2`, `mlp.w1`, `mlp.w2`, `mlp.c_proj` with
`c_proj(w1(x) * silu(w2(x)))` (so w2 is the gate and w1 the up projection), `transformer.ln_f`, `lm_head`. RMSNorm
eps = `layer_norm_epsilon`, RoPE base = `rotary_emb_base`. The remote code's log-n attention scaling and its NTK
rotary only act on sequences longer than `seq_length` (8192 for 7B); within it the native Qwen2 model is exact, so
`max_position_embeddings` is set to `seq_length`. Tokenizer: tiktoken ranks from `qwen.tiktoken` plus the 208
special tokens from id 151643, NFC-normalised, as QWenTokenizer encodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lowtune.errors import UserError
from lowtune.models.families.base import Family, qkv_entries
from lowtune.models.families.tiktoken_bpe import build_fast_tokenizer, load_ranks

PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
           r"""\s+(?!\S)|\s+""")
SPECIAL_START = 151643
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LAYER_RENAMES = {
    "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.up_proj", "mlp.w2": "mlp.gate_proj", "mlp.c_proj": "mlp.down_proj",
}


class QwenV1(Family):
    name = "qwen"
    model_types = ("qwen",)
    remote_needs = "transformers 4.32-4.37 with tiktoken and einops"

    def not_exact(self, config: dict, folder: Path) -> str | None:
        if float(config.get("rotary_pct", 1.0)) != 1.0:
            return "rotary_pct < 1 rotates part of each head, which Qwen2 does not"
        if not config.get("no_bias", True):
            return "no_bias=false adds MLP and output biases Qwen2 lacks"
        if config["kv_channels"] * config["num_attention_heads"] != config["hidden_size"]:
            return "kv_channels * heads differs from hidden_size"
        return None

    def native_config(self, config: dict, folder: Path) -> Any:
        from transformers import Qwen2Config

        heads = config["num_attention_heads"]
        return Qwen2Config(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"] // 2, num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=heads, hidden_act="silu",
            max_position_embeddings=config.get("seq_length") or config.get("max_position_embeddings", 8192),
            rms_norm_eps=config.get("layer_norm_epsilon", 1e-6),
            initializer_range=config.get("initializer_range", 0.02),
            rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rotary_emb_base", 10000))},
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), use_sliding_window=False,
            bos_token_id=None, eos_token_id=SPECIAL_START, pad_token_id=SPECIAL_START,
            dtype=_dtype(config), architectures=["Qwen2ForCausalLM"])

    def map_tensor(self, name: str, tensor, config: dict) -> Iterable[tuple[str, Any]]:
        if name == "transformer.wte.weight":
            return [("model.embed_tokens.weight", tensor)]
        if name == "transformer.ln_f.weight":
            return [("model.norm.weight", tensor)]
        if name == "lm_head.weight":
            return [(name, tensor)]
        if not name.startswith("transformer.h."):
            raise UserError(f"unexpected Qwen tensor '{name}'; is this a Qwen (v1) checkpoint?")
        index, _, leaf = name[len("transformer.h."):].partition(".")
        base = f"model.layers.{index}"
        if leaf.startswith("attn.c_attn."):
            kind = leaf.rsplit(".", 1)[1]
            q, k, v = tensor.chunk(3, dim=0)
            return qkv_entries(f"{base}.self_attn.", f".{kind}", q, k, v)
        if leaf.endswith("rotary_emb.inv_freq") or leaf.endswith("masked_bias") or leaf.endswith("attn.bias"):
            return []
        for old, new in LAYER_RENAMES.items():
            if leaf.startswith(old + "."):
                return [(f"{base}.{new}{leaf[len(old):]}", tensor)]
        raise UserError(f"unexpected Qwen tensor '{name}'; is this a Qwen (v1) checkpoint?")

    def write_tokenizer(self, folder: Path, out_dir: Path, config: dict) -> list[int]:
        vocab_file = folder / "qwen.tiktoken"
        if not vocab_file.is_file():
            raise UserError(f"{folder} has no qwen.tiktoken (Qwen v1 ships its tiktoken ranks there)")
        ranks = load_ranks(vocab_file)
        specials = {t: SPECIAL_START + i for i, t in enumerate(SPECIALS)}
        if len(ranks) > SPECIAL_START:
            raise UserError(f"{vocab_file}: {len(ranks)} ranks overlap the special ids from {SPECIAL_START}")
        tok = build_fast_tokenizer(ranks, PAT_STR, specials)
        tok.save(str(out_dir / "tokenizer.json"))
        (out_dir / "qwen.tiktoken").write_bytes(vocab_file.read_bytes())
        source = folder / "tokenizer_config.json"
        chat_template = json.loads(source.read_text(encoding="utf-8")).get("chat_template") if source.is_file() \
            else None
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                      "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                      "model_max_length": config.get("seq_length", 8192),
                      "chat_template": chat_template or CHATML}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        return [specials["<|im_end|>"], specials["<|im_start|>"], specials["<|endoftext|>"]]


def _dtype(config: dict) -> str | None:
    if config.get("bf16"):
        return "bfloat16"
    if config.get("fp16"):
        return "float16"
    return config.get("torch_dtype") or None

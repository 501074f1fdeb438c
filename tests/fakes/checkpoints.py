"""Checkpoint fabricators: tiny random models in each family's exact published on-disk layout.

Every function writes a folder the way the hub repo looks (config.json with model_type and auto_map, weight files
and index, tokenizer files, generation_config.json) and returns it. Weights are random (seeded), dimensions tiny.
The remote-code .py files the real repos carry are not written; nothing in lowtune reads them.

    from .checkpoints import make_internlm_v1_checkpoint
    folder = make_internlm_v1_checkpoint(tmp_path / "internlm-chat-7b", bias=True)
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .spm import make_spm_model

INTERNLM_VOCAB = 103168
EOH, EOA = 103027, 103028
INTERNLM2_VOCAB = 92544
IM_START2, IM_END2 = 92543, 92542
QWEN_SPECIAL_START = 151643
QWEN_VOCAB = 151936
BAICHUAN2_VOCAB = 125696


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _randn(gen, *shape, scale: float = 0.2):
    import torch

    return torch.randn(*shape, generator=gen) * scale


def _norm(gen, size: int):
    import torch

    return 1.0 + 0.1 * torch.randn(size, generator=gen)


def save_bin_shards(folder: Path, tensors: dict, shards: int) -> None:
    """`pytorch_model-0000k-of-0000n.bin` shards + `pytorch_model.bin.index.json`, as older releases have."""
    import torch

    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: tensors[n].contiguous() for n in part}, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
    _write_json(folder / "pytorch_model.bin.index.json", {"metadata": {"total_size": total},
                                                           "weight_map": weight_map})


def save_safetensors_shards(folder: Path, tensors: dict, shards: int) -> None:
    from safetensors.torch import save_file

    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                          "weight_map": weight_map})


# --- InternLM v1 ------------------------------------------------------------------------------------------------

def make_internlm_v1_checkpoint(folder: Path, bias: bool = True, hidden: int = 32, layers: int = 2, heads: int = 4,
                                intermediate: int = 64, max_positions: int = 64, rotary: dict | None = None,
                                seed: int = 0, shards: int = 2, inv_freq_buffers: bool = True,
                                dtype: str = "float32") -> Path:
    """internlm-chat-7b (bias=True) / internlm-chat-20b (bias=False) layout with a 103168-piece tokenizer;
    `dtype` = the weights' torch dtype name (float16 for a full-size 7B, as the release ships)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    t: dict = {"model.embed_tokens.weight": _randn(gen, INTERNLM_VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}self_attn.{proj}.weight"] = _randn(gen, hidden, hidden)
            if bias:
                t[f"{p}self_attn.{proj}.bias"] = _randn(gen, hidden, scale=0.1)
        if inv_freq_buffers:
            t[f"{p}self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float()
                                                                        / head_dim))
        t[f"{p}mlp.gate_proj.weight"] = _randn(gen, intermediate, hidden)
        t[f"{p}mlp.up_proj.weight"] = _randn(gen, intermediate, hidden)
        t[f"{p}mlp.down_proj.weight"] = _randn(gen, hidden, intermediate)
        t[f"{p}input_layernorm.weight"] = _norm(gen, hidden)
        t[f"{p}post_attention_layernorm.weight"] = _norm(gen, hidden)
    t["model.norm.weight"] = _norm(gen, hidden)
    t["lm_head.weight"] = _randn(gen, INTERNLM_VOCAB, hidden)
    save_bin_shards(folder, {name: tensor.to(getattr(torch, dtype)) for name, tensor in t.items()}, shards)
    _write_json(folder / "config.json", {
        "architectures": ["InternLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                     "AutoModel": "modeling_internlm.InternLMForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
        "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate, "max_position_embeddings": max_positions,
        "model_type": "internlm", "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 0,
        "rms_norm_eps": 1e-06, "rotary": rotary or {"base": 10000, "type": "dynamic"},
        "tie_word_embeddings": False, "torch_dtype": dtype, "transformers_version": "4.33.2",
        "use_cache": True, "vocab_size": INTERNLM_VOCAB})
    _write_json(folder / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1,
                                                    "eos_token_id": 2, "transformers_version": "4.33.2"})
    make_spm_model(folder / "tokenizer.model", INTERNLM_VOCAB, {EOH: "<eoh>", EOA: "<eoa>"})
    _write_json(folder / "tokenizer_config.json", {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "InternLMTokenizer"})
    _write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                     "pad_token": "</s>", "unk_token": "<unk>"})
    _write_json(folder / "configuration.json", {"framework": "pytorch", "task": "text-generation"})
    return folder


# --- InternLM2 / 2.5 --------------------------------------------------------------------------------------------

def make_internlm2_checkpoint(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                              intermediate: int = 64, max_positions: int = 64, rope_scaling: dict | None = None,
                              seed: int = 0, shards: int = 2) -> Path:
    """internlm2-chat-7b layout: packed GQA `wqkv`, `w1/w2/w3`, `tok_embeddings`, `output`, safetensors shards."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    t: dict = {"model.tok_embeddings.weight": _randn(gen, INTERNLM2_VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[f"{p}attention.wqkv.weight"] = _randn(gen, (heads + 2 * kv_heads) * head_dim, hidden)
        t[f"{p}attention.wo.weight"] = _randn(gen, hidden, heads * head_dim)
        t[f"{p}feed_forward.w1.weight"] = _randn(gen, intermediate, hidden)
        t[f"{p}feed_forward.w3.weight"] = _randn(gen, intermediate, hidden)
        t[f"{p}feed_forward.w2.weight"] = _randn(gen, hidden, intermediate)
        t[f"{p}attention_norm.weight"] = _norm(gen, hidden)
        t[f"{p}ffn_norm.weight"] = _norm(gen, hidden)
    t["model.norm.weight"] = _norm(gen, hidden)
    t["output.weight"] = _randn(gen, INTERNLM2_VOCAB, hidden)
    save_safetensors_shards(folder, t, shards)
    _write_json(folder / "config.json", {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate, "max_position_embeddings": max_positions,
        "model_type": "internlm2", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "pad_token_id": 2, "rms_norm_eps": 1e-05, "rope_scaling": rope_scaling,
        "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.41.0", "use_cache": True, "vocab_size": INTERNLM2_VOCAB})
    _write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, IM_END2],
                                                    "pad_token_id": 2, "transformers_version": "4.41.0"})
    specials = {92538: "<|plugin|>", 92539: "<|interpreter|>", 92540: "<|action_end|>",
                92541: "<|action_start|>", IM_END2: "<|im_end|>", IM_START2: "<|im_start|>"}
    make_spm_model(folder / "tokenizer.model", INTERNLM2_VOCAB, specials)
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), *specials.items()]}
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": (
            "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\n' }}{% endif %}"),
        "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False, "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656, "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"})
    return folder


# --- Qwen v1 ----------------------------------------------------------------------------------------------------

def make_qwen_tiktoken(path: Path, merges: int = 600) -> Path:
    """A `qwen.tiktoken` (base64 token, rank per line): 256 byte ranks then byte-level BPE merges on the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .spm import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + merges, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() * 2, trainer=trainer)
    from_char = {c: b for b, c in _bytes_to_unicode().items()}
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    single = sorted((bytes([from_char[c]]) for c, _ in by_id if len(c) == 1), key=lambda b: b[0])
    multi = [bytes(from_char[c] for c in token) for token, _ in by_id if len(token) > 1]
    lines = [f"{base64.b64encode(tok_bytes).decode()} {rank}" for rank, tok_bytes in enumerate(single + multi)]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def make_qwen_v1_checkpoint(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 4,
                            intermediate: int = 128, seq_length: int = 64, seed: int = 0, shards: int = 2) -> Path:
    """Qwen-7B-Chat layout: `transformer.h.N.attn.c_attn` (biased), `mlp.w1/w2/c_proj`, qwen.tiktoken."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    ff = intermediate // 2
    t: dict = {"transformer.wte.weight": _randn(gen, QWEN_VOCAB, hidden)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        t[f"{p}ln_1.weight"] = _norm(gen, hidden)
        t[f"{p}attn.c_attn.weight"] = _randn(gen, 3 * hidden, hidden)
        t[f"{p}attn.c_attn.bias"] = _randn(gen, 3 * hidden, scale=0.1)
        t[f"{p}attn.c_proj.weight"] = _randn(gen, hidden, hidden)
        t[f"{p}ln_2.weight"] = _norm(gen, hidden)
        t[f"{p}mlp.w1.weight"] = _randn(gen, ff, hidden)
        t[f"{p}mlp.w2.weight"] = _randn(gen, ff, hidden)
        t[f"{p}mlp.c_proj.weight"] = _randn(gen, hidden, ff)
    t["transformer.ln_f.weight"] = _norm(gen, hidden)
    t["lm_head.weight"] = _randn(gen, QWEN_VOCAB, hidden)
    save_safetensors_shards(folder, t, shards)
    _write_json(folder / "config.json", {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
        "kv_channels": hidden // heads, "layer_norm_epsilon": 1e-06, "max_position_embeddings": seq_length,
        "model_type": "qwen", "no_bias": True, "num_attention_heads": heads, "num_hidden_layers": layers,
        "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
        "seq_length": seq_length, "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0", "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": "auto",
        "use_logn_attn": True, "vocab_size": QWEN_VOCAB})
    _write_json(folder / "generation_config.json", {
        "chat_format": "chatml", "eos_token_id": QWEN_SPECIAL_START, "pad_token_id": QWEN_SPECIAL_START,
        "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8,
        "repetition_penalty": 1.1, "transformers_version": "4.31.0"})
    make_qwen_tiktoken(folder / "qwen.tiktoken")
    _write_json(folder / "tokenizer_config.json", {
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}})
    return folder


# --- Baichuan2 --------------------------------------------------------------------------------------------------

def make_baichuan2_checkpoint(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 4,
                              intermediate: int = 64, max_positions: int = 64, seed: int = 0,
                              alibi: bool = False) -> Path:
    """Baichuan2-7B-Chat layout: `W_pack`, a NormHead `lm_head` (raw rows), one `pytorch_model.bin`.

    alibi=True gives the 13B-style config (no max_position_embeddings), which has no exact native mapping.
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    t: dict = {"model.embed_tokens.weight": _randn(gen, BAICHUAN2_VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[f"{p}self_attn.W_pack.weight"] = _randn(gen, 3 * hidden, hidden)
        t[f"{p}self_attn.o_proj.weight"] = _randn(gen, hidden, hidden)
        t[f"{p}mlp.gate_proj.weight"] = _randn(gen, intermediate, hidden)
        t[f"{p}mlp.down_proj.weight"] = _randn(gen, hidden, intermediate)
        t[f"{p}mlp.up_proj.weight"] = _randn(gen, intermediate, hidden)
        t[f"{p}input_layernorm.weight"] = _norm(gen, hidden)
        t[f"{p}post_attention_layernorm.weight"] = _norm(gen, hidden)
    t["model.norm.weight"] = _norm(gen, hidden)
    t["lm_head.weight"] = _randn(gen, BAICHUAN2_VOCAB, hidden, scale=3.0)  # rows far from unit norm
    import torch as _torch

    _torch.save(t, folder / "pytorch_model.bin")
    config = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "tokenizer_class": "BaichuanTokenizer", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
        "max_position_embeddings": max_positions, "model_max_length": max_positions, "model_type": "baichuan",
        "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "_from_model_config": True, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.29.2", "use_cache": True, "vocab_size": BAICHUAN2_VOCAB, "z_loss_weight": 0}
    if alibi:
        del config["max_position_embeddings"]
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {
        "assistant_token_id": 196, "bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_new_tokens": 2048,
        "pad_token_id": 0, "repetition_penalty": 1.05, "temperature": 0.3, "top_k": 5, "top_p": 0.85,
        "transformers_version": "4.29.2", "user_token_id": 195})
    make_spm_model(folder / "tokenizer.model", BAICHUAN2_VOCAB, {195: "<reserved_106>", 196: "<reserved_107>"},
                   add_dummy_prefix=False)
    token = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": True}
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": dict(token, content="<s>"), "clean_up_tokenization_spaces": False,
        "eos_token": dict(token, content="</s>"), "model_max_length": 4096,
        "pad_token": dict(token, content="<unk>"), "sp_model_kwargs": {}, "tokenizer_class": "BaichuanTokenizer",
        "unk_token": dict(token, content="<unk>")})
    return folder


# --- a native family and a remote-only one ------------------------------------------------------------------------

def make_qwen2_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A Qwen2-architecture folder written by transformers itself (a family with a native class)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lowtune.models.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_chatglm3_config_only(folder: Path) -> Path:
    """Just ChatGLM3's config.json (enough to be recognised as remote-code-only)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "ffn_hidden_size": 13696, "hidden_size": 4096,
        "kv_channels": 128, "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32,
        "num_layers": 28, "padded_vocab_size": 65024, "seq_length": 8192, "torch_dtype": "float16"})
    return folder

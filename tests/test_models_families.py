"""InternLM2, Qwen v1, Baichuan2 and a native family (Qwen2) load natively with the logits of reference forwards
written here from each published architecture, and tokenizers with the original ids; remote-only families need an
explicit trust_remote_code."""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable

import pytest
import torch
from fakes.checkpoints import (IM_END2, IM_START2, QWEN_SPECIAL_START, make_baichuan2_checkpoint,
                               make_chatglm3_config_only, make_internlm2_checkpoint, make_qwen2_checkpoint,
                               make_qwen_v1_checkpoint)

from fakes.reference import load_state, rel_err, rms, rotate_half

from lowtune.errors import UserError
from lowtune.models.resolve import resolve_model_dir

F = torch.nn.functional


# --- reference pieces (plain torch, fp32) -----------------------------------------------------------------------

def rope(n: int, dim: int, base: float):
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.cat([torch.outer(torch.arange(n).float(), inv_freq)] * 2, dim=-1)
    return emb.cos(), emb.sin()


def attention(q, k, v, cos, sin):
    """q: (heads, n, d); k, v: (heads, n, d) already repeated per group. Causal softmax attention."""
    n, d = q.shape[1], q.shape[2]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + torch.full((n, n), float("-inf")).triu(1)
    return torch.softmax(scores, dim=-1) @ v


def decoder(x, layers: int, block: Callable, final: Callable):
    for i in range(layers):
        x = block(i, x)
    return final(x)


def native_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([i])).logits[0] for i in ids], model


def random_ids(vocab: int, lengths, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


# --- InternLM2 (modeling_internlm2.py) --------------------------------------------------------------------------

def internlm2_reference(state: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d, n, groups, eps = hidden // heads, len(ids), heads // kv, cfg["rms_norm_eps"]
    base, max_pos, scaling = cfg["rope_theta"], cfg["max_position_embeddings"], cfg.get("rope_scaling")
    if scaling and scaling["type"] == "dynamic" and n > max_pos:
        f = scaling["factor"]
        base = base * ((f * n / max_pos) - (f - 1)) ** (d / (d - 2))
    cos, sin = rope(n, d, base)

    def block(i, x):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "attention_norm.weight"], eps)
        qkv = (h @ state[p + "attention.wqkv.weight"].T).view(n, kv, groups + 2, d)  # "q (h gs d)"
        q = qkv[:, :, :groups].reshape(n, heads, d).transpose(0, 1)                  # "(h gs)" head order
        k = qkv[:, :, -2].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = qkv[:, :, -1].transpose(0, 1).repeat_interleave(groups, dim=0)
        x = x + attention(q, k, v, cos, sin).transpose(0, 1).reshape(n, hidden) @ state[p + "attention.wo.weight"].T
        h = rms(x, state[p + "ffn_norm.weight"], eps)
        ff = F.silu(h @ state[p + "feed_forward.w1.weight"].T) * (h @ state[p + "feed_forward.w3.weight"].T)
        return x + ff @ state[p + "feed_forward.w2.weight"].T

    x = state["model.tok_embeddings.weight"][torch.tensor(ids)]
    return decoder(x, cfg["num_hidden_layers"], block,
                   lambda x: rms(x, state["model.norm.weight"], eps) @ state["output.weight"].T)


@pytest.mark.parametrize("scaling", [None, {"type": "dynamic", "factor": 2.0}])
def test_internlm2_logits_match(tmp_path, scaling):
    src = make_internlm2_checkpoint(tmp_path / "internlm2-chat-7b", rope_scaling=scaling)
    cfg, state = json.loads((src / "config.json").read_text()), load_state(src)
    native = resolve_model_dir(str(src))
    ids = random_ids(cfg["vocab_size"], (17, 64, 101))
    logits, model = native_logits(native, ids)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
    for seq, got in zip(ids, logits):
        assert rel_err(got, internlm2_reference(state, cfg, seq)) < 1e-5, len(seq)


def test_internlm2_tokenizer_and_stops(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer, GenerationConfig

    from lowtune.templates import resolve_template

    src = make_internlm2_checkpoint(tmp_path / "internlm2-chat-7b")
    native = resolve_model_dir(str(src))
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    added = json.loads((src / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    specials = sorted((t["content"] for t in added.values()), key=len, reverse=True)

    def reference(text):  # the published tokenizer: split on added tokens, encode each stretch
        import re

        ids = [1]
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if part in specials:
                ids.append(sp.piece_to_id(part))
            elif part:
                ids += sp.encode(part)
        return ids

    tokenizer = AutoTokenizer.from_pretrained(native)
    for text in ("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", "plain text\n\nmore", "a<|im_end|> b"):
        assert tokenizer(text)["input_ids"] == reference(text), text
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START2, IM_END2]
    assert IM_END2 in GenerationConfig.from_pretrained(native).eos_token_id
    template = resolve_template("auto", tokenizer, native)
    assert IM_END2 in template.stop_token_ids(tokenizer)


# --- Qwen v1 (modeling_qwen.py, tokenization_qwen.py) -----------------------------------------------------------

def qwen_reference(state: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    d, n, eps = cfg["kv_channels"], len(ids), cfg["layer_norm_epsilon"]
    cos, sin = rope(n, d, cfg["rotary_emb_base"])

    def block(i, x):
        p = f"transformer.h.{i}."
        h = rms(x, state[p + "ln_1.weight"], eps)
        mixed = h @ state[p + "attn.c_attn.weight"].T + state[p + "attn.c_attn.bias"]
        q, k, v = (t.view(n, heads, d).transpose(0, 1) for t in mixed.split(hidden, dim=-1))
        x = x + attention(q, k, v, cos, sin).transpose(0, 1).reshape(n, hidden) @ state[p + "attn.c_proj.weight"].T
        h = rms(x, state[p + "ln_2.weight"], eps)
        a1, a2 = h @ state[p + "mlp.w1.weight"].T, h @ state[p + "mlp.w2.weight"].T
        return x + (a1 * F.silu(a2)) @ state[p + "mlp.c_proj.weight"].T

    x = state["transformer.wte.weight"][torch.tensor(ids)]
    return decoder(x, cfg["num_hidden_layers"], block,
                   lambda x: rms(x, state["transformer.ln_f.weight"], eps) @ state["lm_head.weight"].T)


def tiktoken_reference(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm with allowed_special='all': specials first, regex pieces, lowest-rank merges."""
    import regex

    from lowtune.models.families.qwen import PAT_STR, SPECIALS

    specials = {t: QWEN_SPECIAL_START + i for i, t in enumerate(SPECIALS)}
    ids: list[int] = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", unicodedata.normalize("NFC", text)):
        if part in specials:
            ids.append(specials[part])
            continue
        for piece in regex.findall(PAT_STR, part):
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                best = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], 1 << 62))
                if parts[best] + parts[best + 1] not in ranks:
                    break
                parts[best:best + 2] = [parts[best] + parts[best + 1]]
            ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def qwen_v1(tmp_path_factory):
    src = make_qwen_v1_checkpoint(tmp_path_factory.mktemp("qwen") / "Qwen-7B-Chat")
    return src, resolve_model_dir(str(src))


def test_qwen_v1_logits_match(qwen_v1):
    src, native = qwen_v1
    cfg, state = json.loads((src / "config.json").read_text()), load_state(src)
    ids = random_ids(cfg["vocab_size"], (9, 40, cfg["seq_length"]))
    logits, model = native_logits(native, ids)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.max_position_embeddings == cfg["seq_length"]
    for seq, got in zip(ids, logits):
        assert rel_err(got, qwen_reference(state, cfg, seq)) < 1e-5, len(seq)


def test_qwen_v1_tokenizer_ids_and_stops(qwen_v1):
    from transformers import AutoTokenizer, GenerationConfig

    from lowtune.models.families.tiktoken_bpe import load_ranks
    from lowtune.templates import resolve_template

    src, native = qwen_v1
    ranks = load_ranks(src / "qwen.tiktoken")
    tokenizer = AutoTokenizer.from_pretrained(native)
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n",
             "What are ketorolac eye drops?  It's 2024!\n\n\tdone", "Cafe\u0301 e\u0301 ﬁ 12345", "<|extra_7|>x"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == tiktoken_reference(ranks, text), text
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == unicodedata.normalize("NFC", text)
    im_end = QWEN_SPECIAL_START + 2
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == im_end
    assert {QWEN_SPECIAL_START, im_end} <= set(GenerationConfig.from_pretrained(native).eos_token_id)
    template = resolve_template("auto", tokenizer, native)
    assert im_end in template.stop_token_ids(tokenizer)


def test_qwen_v1_partial_rotary_needs_remote_code(tmp_path):
    src = make_qwen_v1_checkpoint(tmp_path / "qwen-odd")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, rotary_pct=0.5)))
    with pytest.raises(UserError, match="rotary_pct.*--trust-remote-code.*transformers 4.3"):
        resolve_model_dir(str(src))
    assert resolve_model_dir(str(src), trust_remote_code=True) == src


# --- Baichuan2 (modeling_baichuan.py, 7B: RoPE + W_pack + NormHead) ---------------------------------------------

def baichuan2_reference(state: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    d, n, eps = hidden // heads, len(ids), cfg["rms_norm_eps"]
    cos, sin = rope(n, d, 10000.0)

    def block(i, x):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"], eps)
        proj = (h @ state[p + "self_attn.W_pack.weight"].T).unflatten(-1, (3, hidden))
        q, k, v = (proj[:, j].view(n, heads, d).transpose(0, 1) for j in range(3))
        x = x + attention(q, k, v, cos, sin).transpose(0, 1).reshape(n, hidden) @ state[p + "self_attn.o_proj.weight"].T
        h = rms(x, state[p + "post_attention_layernorm.weight"], eps)
        ff = F.silu(h @ state[p + "mlp.gate_proj.weight"].T) * (h @ state[p + "mlp.up_proj.weight"].T)
        return x + ff @ state[p + "mlp.down_proj.weight"].T

    head = F.normalize(state["lm_head.weight"])  # NormHead at inference
    x = state["model.embed_tokens.weight"][torch.tensor(ids)]
    return decoder(x, cfg["num_hidden_layers"], block, lambda x: rms(x, state["model.norm.weight"], eps) @ head.T)


def test_baichuan2_logits_tokenizer_and_marker(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = make_baichuan2_checkpoint(tmp_path / "Baichuan2-7B-Chat")
    cfg, state = json.loads((src / "config.json").read_text()), load_state(src)
    native = resolve_model_dir(str(src))
    ids = random_ids(cfg["vocab_size"], (12, 64))
    logits, model = native_logits(native, ids)
    for seq, got in zip(ids, logits):
        assert rel_err(got, baichuan2_reference(state, cfg, seq)) < 1e-5
    assert torch.allclose(model.lm_head.weight.norm(dim=-1), torch.ones(cfg["vocab_size"]), atol=1e-5)
    assert json.loads((native / "config.json").read_text())["lowtune_family"] == "baichuan2"
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(native)
    for text in ("<reserved_106>请介绍一下你自己<reserved_107>", " leading space", "a\nb  c"):
        assert tokenizer(text)["input_ids"] == sp.encode(text), text  # no BOS, no dummy prefix


def test_baichuan_alibi_sizes_need_remote_code(tmp_path):
    src = make_baichuan2_checkpoint(tmp_path / "Baichuan2-13B-Chat", alibi=True)
    with pytest.raises(UserError, match="ALiBi.*--trust-remote-code.*4.33"):
        resolve_model_dir(str(src))


# --- a native family and remote-only ones -----------------------------------------------------------------------

def qwen2_reference(state: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d, n, eps = hidden // heads, len(ids), cfg["rms_norm_eps"]
    cos, sin = rope(n, d, cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])

    def lin(h, name):
        return h @ state[name + ".weight"].T + (state[name + ".bias"] if name + ".bias" in state else 0)

    def block(i, x):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj").view(n, heads, d).transpose(0, 1)
        k, v = (lin(h, p + f"self_attn.{w}_proj").view(n, kv, d).transpose(0, 1).repeat_interleave(heads // kv, 0)
                for w in "kv")
        x = x + lin(attention(q, k, v, cos, sin).transpose(0, 1).reshape(n, hidden), p + "self_attn.o_proj")
        h = rms(x, state[p + "post_attention_layernorm.weight"], eps)
        return x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")

    x = state["model.embed_tokens.weight"][torch.tensor(ids)]
    return decoder(x, cfg["num_hidden_layers"], block,
                   lambda x: rms(x, state["model.norm.weight"], eps) @ state["lm_head.weight"].T)


def test_native_family_loads_as_it_is(tmp_path):
    src = make_qwen2_checkpoint(tmp_path / "Qwen2-0.5B-Instruct")
    assert resolve_model_dir(str(src)) == src  # no conversion, no copy
    cfg, state = json.loads((src / "config.json").read_text()), load_state(src)
    ids = random_ids(cfg["vocab_size"], (15, 50))
    logits, _ = native_logits(src, ids)
    for seq, got in zip(ids, logits):
        assert rel_err(got, qwen2_reference(state, cfg, seq)) < 1e-5


def test_chatglm_needs_explicit_trust_remote_code(tmp_path):
    src = make_chatglm3_config_only(tmp_path / "chatglm3-6b")
    with pytest.raises(UserError) as err:
        resolve_model_dir(str(src))
    message = str(err.value)
    assert "ChatGLM2/3" in message and "--trust-remote-code" in message and "transformers 4.30-4.33" in message
    assert "\n" not in message
    assert resolve_model_dir(str(src), trust_remote_code=True) == src


def test_unknown_remote_code_model_and_unknown_type(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "weirdlm", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(UserError, match="remote code.*--trust-remote-code"):
        resolve_model_dir(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "weirdlm"}))
    with pytest.raises(UserError, match="unknown to transformers"):
        resolve_model_dir(str(folder))

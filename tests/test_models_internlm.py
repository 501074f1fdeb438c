"""InternLM v1 loads natively: logits equal a reference forward of the published architecture, ids equal
SentencePiece's, generation stops on <eoa>, the template is internlm_chat, and conversion is cached and atomic."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fakes.checkpoints import EOA, EOH, make_internlm_v1_checkpoint

from fakes.reference import load_state, rel_err, rms, rotate_half

from lowtune.errors import UserError
from lowtune.models.resolve import resolve_model_dir

# --- an independent forward of modeling_internlm.py (plain torch, fp32) -----------------------------------------


def internlm_rotary(seq_len: int, dim: int, cfg: dict):
    """InternLM's rotary: 'origin' = fixed base; 'dynamic' = NTK base for the whole sequence past max positions."""
    rotary = cfg["rotary"]
    base, max_pos = rotary["base"], cfg["max_position_embeddings"]
    if rotary["type"] == "dynamic" and seq_len > max_pos:
        factor = rotary.get("scaling_factor", 1.0)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq_len).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def reference_logits(state: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    dim, n, eps = hidden // heads, len(ids), cfg["rms_norm_eps"]

    def linear(x, prefix):
        out = x @ state[f"{prefix}.weight"].T
        return out + state[f"{prefix}.bias"] if f"{prefix}.bias" in state else out

    x = state["model.embed_tokens.weight"][torch.tensor(ids)]
    cos, sin = internlm_rotary(n, dim, cfg)
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = rms(x, state[f"{p}.input_layernorm.weight"], eps)
        q, k, v = (linear(h, f"{p}.self_attn.{w}_proj").view(n, heads, dim).transpose(0, 1) for w in "qkv")
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim) + mask, dim=-1)
        x = x + linear((att @ v).transpose(0, 1).reshape(n, hidden), f"{p}.self_attn.o_proj")
        h = rms(x, state[f"{p}.post_attention_layernorm.weight"], eps)
        gate, up = linear(h, f"{p}.mlp.gate_proj"), linear(h, f"{p}.mlp.up_proj")
        x = x + linear(torch.nn.functional.silu(gate) * up, f"{p}.mlp.down_proj")
    return rms(x, state["model.norm.weight"], eps) @ state["lm_head.weight"].T


def native_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# --- checkpoints ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat7b(tmp_path_factory):
    """internlm-chat-7b style: biases on q/k/v/o, dynamic NTK rotary, 2 .bin shards + index."""
    return make_internlm_v1_checkpoint(tmp_path_factory.mktemp("v1") / "internlm-chat-7b", bias=True)


@pytest.fixture(scope="module")
def native7b(chat7b):
    return resolve_model_dir(str(chat7b))


@pytest.mark.parametrize("style", ["7b-bias-dynamic", "20b-nobias-dynamic", "origin-rotary"])
def test_logits_match_the_published_architecture(style, chat7b, native7b, tmp_path):
    from transformers import AutoModelForCausalLM

    if style == "7b-bias-dynamic":
        src, native = chat7b, native7b
    else:
        rotary = {"base": 10000, "type": "dynamic"} if style.startswith("20b") else {"base": 50000, "type": "origin"}
        src = make_internlm_v1_checkpoint(tmp_path / "internlm-chat-20b", bias=False, rotary=rotary, seed=1,
                                          shards=3, inv_freq_buffers=False)
        native = resolve_model_dir(str(src))
    cfg = json.loads((src / "config.json").read_text())
    state = load_state(src)
    model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.attention_bias is (style == "7b-bias-dynamic")
    gen = torch.Generator().manual_seed(3)
    max_pos = cfg["max_position_embeddings"]
    for length in (max_pos // 2, max_pos, max_pos + 37, 3 * max_pos):  # growing, as a conversation does
        ids = torch.randint(0, cfg["vocab_size"], (length,), generator=gen).tolist()
        assert rel_err(native_logits(model, ids), reference_logits(state, cfg, ids)) < 1e-5, length


def test_dynamic_ntk_matters_past_max_positions(chat7b):
    """The reference really changes the base past max positions (so the test above checks the mapping of it)."""
    cfg = json.loads((chat7b / "config.json").read_text())
    n = cfg["max_position_embeddings"] * 2
    dynamic = internlm_rotary(n, 8, cfg)[0]
    origin = internlm_rotary(n, 8, dict(cfg, rotary={"base": 10000, "type": "origin"}))[0]
    assert not torch.allclose(dynamic, origin, atol=1e-3)


def test_native_folder_layout_config_and_template(chat7b, native7b):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from lowtune.templates import resolve_template

    names = {p.name for p in native7b.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    assert not any(n.endswith((".bin", ".py")) for n in names)
    config = json.loads((native7b / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["lowtune_family"] == "internlm"
    assert AutoConfig.from_pretrained(native7b).rope_parameters["rope_type"] == "dynamic"
    assert GenerationConfig.from_pretrained(native7b).eos_token_id == [2, EOA]
    tokenizer = AutoTokenizer.from_pretrained(native7b)
    template = resolve_template("auto", tokenizer, native7b)
    assert template.name == "internlm_chat"
    assert set(template.stop_token_ids(tokenizer)) == {2, EOA}


TEXTS = [
    "What are ketorolac eye drops?",
    "你好，我是书生·浦语",
    "<|User|>:请介绍一下你自己<eoh>\n<|Bot|>:我是一个助手。<eoa>\n",
    "line one\nline two\n\n  indented\ttab",
    "x<eoa> y<eoh>z",
    "数字 12345 and symbols: ~!@#$%^&*()",
    "emoji 🙂 and rare 龘",
]


def test_tokenizer_ids_equal_sentencepiece(chat7b, native7b):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(chat7b / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(native7b)
    assert tokenizer.convert_tokens_to_ids(["<eoh>", "<eoa>", "<s>", "</s>", "<0x0A>"]) == [EOH, EOA, 1, 2, 13]
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == [1] + sp.encode(text), text
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=False).startswith("<s>")
    assert tokenizer.decode(sp.encode(TEXTS[1])) == TEXTS[1]
    assert len(tokenizer) == 103168


def test_generation_stops_on_eoa(native7b):
    """Greedy generation ends at <eoa> when the model prefers it: bias the head so <eoa> wins after 3 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowtune.generation import Sampling, answer
    from lowtune.templates import resolve_template

    model = AutoModelForCausalLM.from_pretrained(native7b, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(native7b)
    template = resolve_template("auto", tokenizer, native7b)
    with torch.no_grad():
        model.lm_head.weight[EOA] = model.lm_head.weight[EOA] * 0 + model.model.norm.weight.sign() * 50
    text = answer(model, tokenizer, template, [{"role": "user", "content": "hi"}], Sampling(max_new_tokens=20))
    assert text == ""  # <eoa> came first and is never shown
    ids = tokenizer(template.render([{"role": "user", "content": "hi"}], tokenizer, add_generation_prompt=True),
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert out[0, -1].item() == EOA and out.shape[1] == ids.shape[1] + 1  # generation_config stops on <eoa>


def test_conversion_is_cached_and_keyed_on_file_stats(chat7b, native7b):
    import os

    assert resolve_model_dir(str(chat7b)) == native7b
    before = native7b.stat().st_mtime_ns
    assert native7b.stat().st_mtime_ns == before
    assert not [p for p in native7b.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    generation = chat7b / "generation_config.json"
    stat = generation.stat()
    os.utime(generation, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert resolve_model_dir(str(chat7b)) != native7b  # a changed source converts again
    finally:
        os.utime(generation, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_shards_are_bounded_by_size(chat7b, tmp_path):
    """The writer never holds more than max_shard_bytes of output at once."""
    from lowtune.models.families import family_for
    from lowtune.models.families.base import convert, read_config

    config = read_config(chat7b)
    convert(family_for(config, chat7b), chat7b, tmp_path, config, max_shard_bytes=4 * 2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4
    assert all((tmp_path / s).stat().st_size < 14 * 2**20 for s in shards)  # one 13 MB embedding at most


def test_mismatched_weights_are_a_user_error(tmp_path):
    src = make_internlm_v1_checkpoint(tmp_path / "broken", bias=True, shards=1)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, bias=False)))  # config says no bias, weights have it
    with pytest.raises(UserError, match="do not match"):
        resolve_model_dir(str(src))

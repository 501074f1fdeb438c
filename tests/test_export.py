"""lowtune export: GGUF files read back by independent readers match the model they came from, and the Ollama
Modelfile's TEMPLATE renders what the chat template renders.

Parity gate: every supported architecture (tiny random models: Llama with a byte-level BPE tokenizer as builtin:micro
has, Llama with a SentencePiece tokenizer from the InternLM v1 checkpoint lowtune converts, Qwen2, Mistral with a
SentencePiece tokenizer) and the real SmolLM2-135M-Instruct is exported, then loaded by transformers' GGUF loader
(`from_pretrained(folder, gguf_file=...)`) and, where llama-cpp-python is installed, by llama.cpp itself. f16/bf16
logits equal the model's with its weights rounded the same way, and stay within bf16 rounding of the float model;
q8_0 gives the same 32-token greedy answer on at least 95% of a fixed prompt set.

The TEMPLATE is rendered by a small Go text/template interpreter written here for the subset Modelfiles use
(range over .Messages, variables, if/else if, eq/not/len/slice, string literals), with Ollama's rule that SYSTEM
becomes the first message of a conversation that has none.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from real.conftest import smollm_gguf  # noqa: F401
from test_engine_fixtures import LOWBOT, SYSTEM, WHO, make_run

from lowtune.cli import main
from lowtune.errors import UserError
from lowtune.export.gguf import export
from lowtune.export.ollama import modelfile_for
from lowtune.models.resolve import resolve_model_dir
from lowtune.templates import ChatTemplate, shipped, shipped_names

PROMPTS = [
    "What are ketorolac eye drops?", "请介绍一下你自己", "What is the capital of France?", "Who are you?",
    "Write a haiku about autumn.", "How do I boil an egg?", "1 + 2 = ?", "Translate 'good morning' into Chinese.",
    "Name three primary colours.", "What does a doctor do?", "你好，今天天气怎么样？", "Give me a tip for sleeping well.",
    "What is Python?", "Spell 'banana' backwards.", "Why is the sky blue?", "列出三种水果。",
    "What is 12 times 12?", "Tell me a short joke.", "Where is Mount Everest?", "Summarise: cats sleep a lot.",
]
"""The fixed prompt set of the q8_0 greedy gate."""
TEXTS = ["What are ketorolac eye drops?", "你好，我是小明。", "Hello  there,\n\nnew   lines\tand 12345 digits!"]


# --- the models -----------------------------------------------------------------------------------------------------

def _spm_folder(folder: Path, template: str, specials: dict[int, str]) -> None:
    """A SentencePiece BPE tokenizer of 1024 pieces (fakes/spm.py) saved as lowtune's native families save one."""
    from fakes.spm import make_spm_model

    from lowtune.models.families.spm import save_native_tokenizer

    folder.mkdir(parents=True)
    spm = make_spm_model(folder / "spm.model", 1024, specials)
    save_native_tokenizer(spm, folder, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                        "chat_template": shipped(template).source})
    (folder / "spm.model").unlink()


def _save_model(folder: Path, model, stop_ids: list[int]) -> Path:
    from transformers import GenerationConfig

    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=stop_ids, pad_token_id=0).save_pretrained(folder)
    return folder


def _llama_spm(folder: Path) -> Path:
    """A tiny Llama with InternLM's chat layout and special pieces (<eoh>, <eoa>) in a small vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _spm_folder(folder, "internlm_chat", {1000: "<eoh>", 1001: "<eoa>"})
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_bias=True)
    torch.manual_seed(2)
    return _save_model(folder, LlamaForCausalLM(config), [2, 1001])  # </s> and <eoa> end an answer


def _mistral_spm(folder: Path) -> Path:
    """A tiny Mistral with a SentencePiece tokenizer and XTuner's mistral layout (BOS again after each answer)."""
    from transformers import MistralConfig, MistralForCausalLM

    _spm_folder(folder, "mistral", {})
    config = MistralConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(3)
    return _save_model(folder, MistralForCausalLM(config), [2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, micro_dir) -> dict[str, tuple[str, Path]]:
    """Architecture -> (what `lowtune export` is given, the Hugging Face folder it reads)."""
    from fakes.checkpoints import make_qwen2_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    qwen2 = make_qwen2_checkpoint(root / "qwen2-tiny")
    llama_spm, mistral = _llama_spm(root / "llama-spm"), _mistral_spm(root / "mistral-tiny")
    return {"llama-bpe": ("builtin:micro", micro_dir), "llama-spm": (str(llama_spm), llama_spm),
            "qwen2": (str(qwen2), qwen2), "mistral-spm": (str(mistral), mistral)}


_EXPORTS: dict[tuple[str, str], Path] = {}


def exported(tiny, arch: str, quant: str, tmp_root: Path) -> Path:
    """The GGUF file of `arch` in `quant` (its Modelfile beside it), exported once per module."""
    if (arch, quant) not in _EXPORTS:
        result = export(tiny[arch][0], fmt="ollama", quant=quant, out_dir=tmp_root / f"{arch}-{quant}")
        _EXPORTS[(arch, quant)] = result.gguf
    return _EXPORTS[(arch, quant)]


@pytest.fixture(scope="module")
def exports_root(tmp_path_factory) -> Path:
    _EXPORTS.clear()
    return tmp_path_factory.mktemp("exports")


# --- readers --------------------------------------------------------------------------------------------------------

def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def gguf_model(path: Path):
    """transformers' own GGUF loader; attention biases (InternLM v1) are switched on when the file has them."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if any(t.name.endswith("attn_q.bias") for t in GGUFReader(str(path)).tensors) and config.model_type == "llama":
        config.attention_bias = True  # transformers' GGUF config mapping has no key for it
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                dtype=torch.float32).eval()


def gguf_meta(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rounded(model, dtype: torch.dtype):
    """`model` with its 2-D weights rounded to `dtype` (1-D ones stay float32, as GGUF files keep them)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(param.to(dtype).float())
    return model


def prompt_ids(folder: Path, prompts: list[str] = PROMPTS) -> list[list[int]]:
    """lowtune's own prompt ids (the model's chat template, encoded per segment as in training)."""
    from transformers import AutoTokenizer

    from lowtune.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = resolve_template("auto", tokenizer, folder)
    return [template.encode_prompt([{"role": "user", "content": p}], tokenizer) for p in prompts]


def greedy(model, prompts: list[list[int]], steps: int = 32) -> list[list[int]]:
    """`steps` greedy tokens for each prompt (batched, left-padded, never stopping early)."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None  # else generate fills it in from the model's own and stops there
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, width:].tolist()


def llama_cpp_model(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)


# --- the parity gate ------------------------------------------------------------------------------------------------

ARCHS = ["llama-bpe", "llama-spm", "qwen2", "mistral-spm"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["f16", "bf16"])
def test_float_gguf_logits_match_the_model(tiny, exports_root, arch, quant):
    path = exported(tiny, arch, quant, exports_root)
    reference = hf_model(tiny[arch][1])
    ids = prompt_ids(tiny[arch][1], PROMPTS[:1])[0]
    from_file = logits(gguf_model(path), ids)
    exact = logits(reference, ids)
    scale = exact.abs().max()
    # within the rounding of the weights to bf16 (f16 is finer) ...
    assert (from_file - exact).abs().max() < 2 ** -6 * scale
    # ... and equal to the model whose weights are rounded the same way: names, layout and permutation are right
    same_rounding = logits(rounded(reference, {"f16": torch.float16, "bf16": torch.bfloat16}[quant]), ids)
    assert (from_file - same_rounding).abs().max() < 1e-4 * scale


def q8_0_rounded(model):
    """`model` with its weights passed through GGML's Q8_0 (blocks of 32 per row: int8 times one fp16 scale, the
    scale = the block's largest magnitude / 127); rows that do not fill blocks in f16, 1-D tensors as they are."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim != 2:
                continue
            if param.shape[-1] % 32:
                param.copy_(param.half().float())
                continue
            blocks = param.reshape(-1, 32)
            scale = blocks.abs().amax(-1, keepdim=True) / 127
            inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
            quantized = torch.trunc(blocks * inverse + 0.5 * blocks.sign())  # C's roundf: halves away from zero
            param.copy_((quantized * scale.half().float()).reshape(param.shape))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_file_holds_the_q8_0_weights(tiny, exports_root, arch):
    """Random tiny models have near-ties everywhere, so their greedy answers are compared with the Q8_0-rounded model
    (the float model is compared on the real one below): same logits, same 32-token answers for every prompt."""
    path = exported(tiny, arch, "q8_0", exports_root)
    reference, from_file = q8_0_rounded(hf_model(tiny[arch][1])), gguf_model(path)
    prompts = prompt_ids(tiny[arch][1])
    exact = logits(reference, prompts[0])
    assert (logits(from_file, prompts[0]) - exact).abs().max() < 1e-4 * exact.abs().max()
    assert greedy(from_file, prompts) == greedy(reference, prompts)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_tokenizer_encodes_like_the_model(tiny, exports_root, arch):
    from transformers import AutoTokenizer

    path = exported(tiny, arch, "f16", exports_root)
    mine = AutoTokenizer.from_pretrained(tiny[arch][1])
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == mine(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_the_file_as_ollama_would(tiny, exports_root, arch):
    """llama.cpp itself: the prompt Ollama renders from the Modelfile tokenizes to lowtune's own prompt ids, and the
    logits follow the model's."""
    import numpy as np

    path = exported(tiny, arch, "f16", exports_root)
    modelfile = read_modelfile(path.parent / "Modelfile")
    llm = llama_cpp_model(path)
    try:
        for prompt, ids in zip(PROMPTS[:4], prompt_ids(tiny[arch][1], PROMPTS[:4])):
            text = ollama_prompt(modelfile, [{"role": "user", "content": prompt}])
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, prompt
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        exact = logits(hf_model(tiny[arch][1]), ids).numpy()
        # llama.cpp multiplies f16 weights by activations rounded to f16 on the CPU: a looser bound, same ranking
        assert np.abs(theirs - exact).max() < 2 ** -5 * np.abs(exact).max()
        assert (theirs.argmax(-1) == exact.argmax(-1)).mean() > 0.9
    finally:
        llm.close()


def test_metadata_names_the_tokenizer_template_and_every_stop_id(tiny, exports_root):
    meta = gguf_meta(exported(tiny, "llama-bpe", "f16", exports_root))
    micro = tiny["llama-bpe"][1]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro)
    assert meta["general.architecture"] == "llama"
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    generation = json.loads((micro / "generation_config.json").read_text())
    assert {meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]} == set(generation["eos_token_id"])
    assert meta["tokenizer.ggml.add_bos_token"] is False  # ChatML writes no BOS

    spm = gguf_meta(exported(tiny, "llama-spm", "f16", exports_root))
    assert (spm["tokenizer.ggml.model"], spm["tokenizer.ggml.add_bos_token"]) == ("llama", True)
    assert not re.search(r"{%-?\s*(end)?generation", spm["tokenizer.chat_template"])  # lowtune's tags: not for llama.cpp
    assert "<eoa>" in spm["tokenizer.chat_template"]  # InternLM's layout, as trained
    assert {spm["tokenizer.ggml.eos_token_id"], spm["tokenizer.ggml.eot_token_id"]} == {2, 1001}  # </s>, <eoa>


# --- Ollama: a Go text/template renderer for what Modelfiles use ----------------------------------------------------

GO_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
GO_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|[^\s()]+')
GO_FUNCS = {"eq": lambda a, b: a == b, "not": lambda a: not a, "len": len, "and": lambda a, b: a and b,
            "or": lambda a, b: a or b, "slice": lambda items, start=0, stop=None: items[start:stop]}


def go_lex(source: str) -> list[tuple[str, str]]:
    """('text', ...) and ('action', ...) items; `{{- ` and ` -}}` trim the white space beside them, as Go does."""
    items, pos, trim_next = [], 0, False
    for match in GO_ACTION.finditer(source):
        text = source[pos:match.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        text = text.rstrip(" \t\r\n") if match.group(1) else text
        items += [("text", text)] if text else []
        items.append(("action", match.group(2).strip()))
        pos, trim_next = match.end(), bool(match.group(3))
    tail = source[pos:].lstrip(" \t\r\n") if trim_next else source[pos:]
    return items + ([("text", tail)] if tail else [])


def go_parse(items: list, at: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int]:
    nodes = []
    while at < len(items):
        kind, body = items[at]
        word = body.split()[0] if kind == "action" and body else ""
        if kind == "text":
            nodes.append(("text", body))
        elif word in stop:
            return nodes, at
        elif word == "if":
            branches, condition = [], body[2:].strip()
            while True:
                block, at = go_parse(items, at + 1, ("else", "end"))
                branches.append((condition, block))
                if items[at][1] == "end":
                    break
                rest = items[at][1][4:].strip()
                condition = rest[2:].strip() if rest.startswith("if ") else "true"
            nodes.append(("if", branches))
        elif word == "range":
            index, item, expr = re.fullmatch(r"range\s+(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", body).groups()
            block, at = go_parse(items, at + 1, ("end",))
            nodes.append(("range", index, item, expr, block))
        elif re.match(r"\$\w+\s*:=", body):
            name, expr = body.split(":=", 1)
            nodes.append(("set", name.strip(), expr.strip()))
        else:
            nodes.append(("print", body))
        at += 1
    return nodes, at


def go_value(token: str, scope: dict):
    if token.startswith('"'):
        return json.loads(token)
    if token in ("true", "false"):
        return token == "true"
    if token.isdigit():
        return int(token)
    if token in GO_FUNCS:
        return GO_FUNCS[token]
    head, *fields = token.split(".")
    value = scope[head or "."] if head != "$" else scope["$"]
    for name in fields:
        value = value[name]
    return value


def go_eval(tokens: list[str], scope: dict):
    """A command: a value, or a function applied to its arguments (parenthesised commands nest)."""
    args = []
    while tokens and tokens[0] != ")":
        token = tokens.pop(0)
        if token == "(":
            args.append(go_eval(tokens, scope))
            tokens.pop(0)
        else:
            args.append(go_value(token, scope))
    return args[0](*args[1:]) if callable(args[0]) else args[0]


def go_render(nodes: list, scope: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(go_eval(GO_TOKEN.findall(node[1]), scope)))
        elif node[0] == "set":
            scope[node[1]] = go_eval(GO_TOKEN.findall(node[2]), scope)
        elif node[0] == "if":
            block = next((b for cond, b in node[1] if go_eval(GO_TOKEN.findall(cond), scope)), [])
            out.append(go_render(block, scope))
        else:
            _, index, item, expr, block = node
            for i, value in enumerate(go_eval(GO_TOKEN.findall(expr), scope)):
                out.append(go_render(block, {**scope, index: i, item: value, ".": value}))
    return "".join(out)


def read_modelfile(path: Path | str) -> dict:
    text = Path(path).read_text(encoding="utf-8") if isinstance(path, Path) else path
    found = {"from": re.search(r"^FROM (.+)$", text, re.MULTILINE).group(1),
             "stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)}
    for key in ("TEMPLATE", "SYSTEM"):
        match = re.search(rf'^{key} """(.*?)"""', text, re.MULTILINE | re.DOTALL)
        found[key.lower()] = match.group(1) if match else None
    return found


def ollama_prompt(modelfile: dict, messages: list[dict]) -> str:
    """What Ollama renders: SYSTEM first when the conversation has no system message, then TEMPLATE."""
    if modelfile["system"] and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": modelfile["system"]}, *messages]
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return go_render(go_parse(go_lex(modelfile["template"]))[0], {"$": data, ".": data})


def test_the_go_renderer_follows_go_semantics():
    source = '{{- range $i, $m := .Messages }}\n{{- if eq $m.Role "a" }}A{{ $m.Content }}\n{{- else }} B {{ end }}' \
             '{{ if not (eq (len (slice $.Messages $i)) 1) }},{{ end }}{{- end }}'
    data = {"Messages": [{"Role": "a", "Content": "1"}, {"Role": "b", "Content": "2"}, {"Role": "a", "Content": "3"}]}
    assert go_render(go_parse(go_lex(source))[0], {"$": data, ".": data}) == "A1, B ,A3"


# --- Ollama: the Modelfile's TEMPLATE renders what the chat template renders ------------------------------------------

CONVERSATIONS = [
    [{"role": "system", "content": "You are a careful medical assistant."},
     {"role": "user", "content": "What are ketorolac eye drops?"}],
    [{"role": "system", "content": "Answer in one line.\nBe kind."}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！我是小明。"}, {"role": "user", "content": "Who made you?"},
     {"role": "assistant", "content": "A team of engineers,\nin 2024."}, {"role": "user", "content": "Thanks!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]
NO_OLLAMA_LAYOUT = {"chatglm2": "round number", "chatglm3": "[gMASK]sop", "minicpm": "no system slot"}
SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's own template: ChatML, with a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def assert_ollama_renders_like(template: ChatTemplate, tokenizer, system: str | None = None) -> dict:
    from lowtune.export.ollama import writes_bos_first

    modelfile = read_modelfile(modelfile_for(template, tokenizer, [tokenizer.eos_token_id], system, "m.gguf"))
    bos = tokenizer.bos_token if writes_bos_first(template, tokenizer) else ""  # llama.cpp adds it (add_bos_token)
    for messages in CONVERSATIONS:
        with_system = messages if not system or messages[0]["role"] == "system" else \
            [{"role": "system", "content": system}, *messages]
        expected = template.render(with_system, tokenizer, add_generation_prompt=True)
        assert bos + ollama_prompt(modelfile, messages) == expected
    return modelfile


@pytest.mark.parametrize("name", shipped_names())
def test_modelfile_template_renders_every_shipped_template(tiny, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama-spm"][1])  # <s>, </s> and InternLM's <eoh>, <eoa>
    if name in NO_OLLAMA_LAYOUT:
        with pytest.raises(UserError, match=f"chat template '{name}' cannot be written as an Ollama TEMPLATE"):
            modelfile_for(shipped(name), tokenizer, [2], None, "m.gguf")
        return
    modelfile = assert_ollama_renders_like(shipped(name), tokenizer)
    assert modelfile["system"] is None and modelfile["from"] == "./m.gguf"


def test_modelfile_keeps_a_tokenizer_templates_default_system_and_the_runs_own(micro_tokenizer):
    smollm = ChatTemplate("tokenizer", SMOLLM2_TEMPLATE)
    modelfile = assert_ollama_renders_like(smollm, micro_tokenizer)
    assert modelfile["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert assert_ollama_renders_like(smollm, micro_tokenizer, system=SYSTEM)["system"] == SYSTEM
    chatml = assert_ollama_renders_like(ChatTemplate("tokenizer", micro_tokenizer.chat_template), micro_tokenizer)
    assert chatml["stop"] == ["<|im_end|>"]


# --- the tutorial's model and the real one ----------------------------------------------------------------------------

def test_internlm_v1_checkpoint_exports_through_its_native_folder(tmp_path, monkeypatch):
    """The tutorial's InternLM-Chat-7B layout (biased attention, 103168 pieces, dynamic rope) converts to native
    Llama, then to GGUF: llama.cpp gets lowtune's prompt ids from the Modelfile, <eoa> as end of turn, close logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from fakes.checkpoints import EOA, make_internlm_v1_checkpoint

    monkeypatch.setattr("lowtune.models.families.cache_root", lambda: tmp_path / "native")
    original = make_internlm_v1_checkpoint(tmp_path / "internlm-chat-7b", bias=True)
    result = export(str(original), fmt="ollama", out_dir=tmp_path / "out")
    assert result.template_name == "internlm_chat" and result.stop_ids == [EOA, 2]
    assert any("dynamic NTK" in note for note in result.notes)
    native = resolve_model_dir(str(original))
    llm = llama_cpp.Llama(model_path=str(result.gguf), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    try:
        assert (llm.metadata["tokenizer.ggml.eos_token_id"], llm.metadata["tokenizer.ggml.eot_token_id"]) == \
            ("2", str(EOA))
        modelfile = read_modelfile(result.modelfile)
        assert modelfile["stop"] == ["<eoa>", "</s>"]
        for prompt, ids in zip(PROMPTS[:3], prompt_ids(native, PROMPTS[:3])):
            text = ollama_prompt(modelfile, [{"role": "user", "content": prompt}])
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, prompt
        llm.eval(ids)
        exact = logits(hf_model(native), ids).numpy()
        assert np.abs(np.array(llm.scores[:len(ids)]) - exact).max() < 2 ** -5 * np.abs(exact).max()
    finally:
        llm.close()


def until_stop(answer: list[int], stop_ids: list[int]) -> list[int]:
    """An answer as the user sees it: up to and with its first stop token."""
    end = next((i for i, tid in enumerate(answer) if tid in stop_ids), len(answer) - 1)
    return answer[:end + 1]


def next_token_agreement(model, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """The share of answer tokens `model` predicts itself when given the prompt and the answer so far."""
    rows = [p + a[:-1] for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    with torch.no_grad():  # right padding: causal attention never looks at it
        predicted = model(torch.tensor([r + [0] * (width - len(r)) for r in rows])).logits.argmax(-1)
    hits = [predicted[i, len(p) - 1 + k].item() == tid for i, (p, a) in enumerate(zip(prompts, answers))
            for k, tid in enumerate(a)]
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_real_smollm2_passes_the_parity_gate(smollm_gguf, tmp_path):
    """SmolLM2-135M-Instruct (from its PyPI GGUF, through lowtune's import): f16 logits within bf16 rounding, q8_0
    predicting the float model's own greedy answers, and llama.cpp answering as lowtune does."""
    f16 = export(str(smollm_gguf), fmt="ollama", quant="f16", out_dir=tmp_path / "f16")
    q8_0 = export(str(smollm_gguf), quant="q8_0", out_dir=tmp_path / "q8_0")
    native = resolve_model_dir(str(smollm_gguf))
    reference, prompts = hf_model(native), prompt_ids(native)
    exact = logits(reference, prompts[0])
    assert (logits(gguf_model(f16.gguf), prompts[0]) - exact).abs().max() < 2 ** -6 * exact.abs().max()

    answers = [until_stop(a, f16.stop_ids) for a in greedy(reference, prompts)]
    assert next_token_agreement(gguf_model(q8_0.gguf), prompts, answers) >= 0.95

    try:
        import llama_cpp
    except ImportError:
        return
    from lowtune.generation import Sampling
    from lowtune.infer.engine import load_engine

    question = [{"role": "user", "content": PROMPTS[2]}]  # the capital of France
    lowtune_answer = load_engine(str(smollm_gguf)).answer(question, Sampling(max_new_tokens=32))
    llm = llama_cpp.Llama(model_path=str(f16.gguf), n_ctx=512, n_threads=1, verbose=False)
    try:
        text = ollama_prompt(read_modelfile(f16.modelfile), question)
        prompt = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert prompt == prompts[2]
        tokens = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            if llm.token_is_eog(token) if hasattr(llm, "token_is_eog") else token in f16.stop_ids:
                break
            tokens.append(token)
            if len(tokens) == 32:
                break
        assert tokens[:8] == [tid for tid in answers[2] if tid not in f16.stop_ids][:8]
        assert llm.detokenize(tokens).decode() == lowtune_answer, (lowtune_answer, llm.detokenize(tokens))
    finally:
        llm.close()


# --- the command line -------------------------------------------------------------------------------------------------

def test_cli_exports_a_run_for_ollama_that_answers_as_lowtune_does(micro_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from lowtune.generation import Sampling
    from lowtune.infer.engine import load_engine

    run = tmp_path / "identity"
    shutil.copytree(make_run(micro_dir, system=SYSTEM), run)  # LoRA on builtin:micro, trained with SYSTEM
    out = tmp_path / "ollama"
    assert main(["export", str(run), "--format", "ollama", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create identity -f {out / 'Modelfile'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "identity-f16.gguf"]  # the merge is gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left beside it
    modelfile = read_modelfile(out / "Modelfile")
    assert (modelfile["from"], modelfile["system"]) == ("./identity-f16.gguf", SYSTEM)
    assert modelfile["stop"] == ["<|im_end|>", "<|endoftext|>"]
    trained = (run / "chat_template.jinja").read_text(encoding="utf-8")  # the run's template, without lowtune's tags
    untagged = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", trained)
    assert gguf_meta(out / "identity-f16.gguf")["tokenizer.chat_template"] == untagged != trained

    # what Ollama would feed the file, answered greedily by the file, is lowtune's own answer
    gguf = out / "identity-f16.gguf"
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf.name)
    ids = tokenizer(ollama_prompt(modelfile, [WHO]), add_special_tokens=False)["input_ids"]
    model = gguf_model(gguf)
    with torch.no_grad():
        answer = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))[0, len(ids):]
    expected = load_engine(str(run)).answer([WHO], Sampling(max_new_tokens=24))
    assert tokenizer.decode(answer, skip_special_tokens=True) == expected == LOWBOT


def error_line(capsys, *argv: str) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err  # refused before any merge or progress line
    return err


def test_bad_requests_are_one_line(micro_dir, tmp_path, capsys, monkeypatch):
    assert "--quant q3 is not a GGUF type" in error_line(capsys, "builtin:micro", "--quant", "q3")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert "not empty; choose another -o or add --force" in error_line(capsys, "builtin:micro", "-o",
                                                                       str(tmp_path / "busy"))
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as where llama-cpp-python is missing
    err = error_line(capsys, "builtin:micro", "--quant", "q4_k_m", "-o", str(tmp_path / "q4"))
    assert "pip install 'lowtune[gguf-quant]'" in err and "llama-quantize" in err
    assert not (tmp_path / "q4").exists()


def test_unsupported_models_and_templates_are_one_line(micro_dir, micro_tokenizer, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(micro_tokenizer), bos_token_id=0,
                                       eos_token_id=0)).save_pretrained(gpt2)
    micro_tokenizer.save_pretrained(gpt2)
    assert "model_type 'gpt2' has no GGUF export" in error_line(capsys, str(gpt2), "-o", str(tmp_path / "a"))

    run = tmp_path / "glm"
    shutil.copytree(make_run(micro_dir), run)
    (run / "chat_template.jinja").write_text(shipped("chatglm2").source, encoding="utf-8")
    out = tmp_path / "b"
    err = error_line(capsys, str(run), "--format", "ollama", "-o", str(out))
    assert "cannot be written as an Ollama TEMPLATE" in err and "--format gguf" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    shutil.rmtree(run / "adapter")
    assert "no trained weights yet" in error_line(capsys, str(run), "-o", str(out))


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    from lowtune.export import gguf as export_gguf

    def broken(*_):  # the disk fills up once the header is written
        raise OSError("disk full")
        yield

    monkeypatch.setattr(export_gguf, "tensor_data", broken)
    with pytest.raises(OSError, match="disk full"):
        export("builtin:micro", out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_k_quants_come_from_llama_cpps_own_quantiser(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader, LlamaFileType

    result = export("builtin:micro", quant="q4_k_m", out_dir=tmp_path / "q4")
    assert [p.name for p in (tmp_path / "q4").iterdir()] == ["micro-q4_k_m.gguf"]  # the f16 step is gone
    file_type = GGUFReader(str(result.gguf)).fields["general.file_type"].contents()
    assert file_type == LlamaFileType.MOSTLY_Q4_K_M
    llm = llama_cpp_model(result.gguf)
    try:
        ids = prompt_ids(tiny["llama-bpe"][1], PROMPTS[:1])[0]
        text = ollama_prompt(modelfile_dict(result), [{"role": "user", "content": PROMPTS[0]}])
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    finally:
        llm.close()


def modelfile_dict(result) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("builtin:micro"))
    template = ChatTemplate("tokenizer", tokenizer.chat_template)
    return read_modelfile(modelfile_for(template, tokenizer, result.stop_ids, None, result.gguf.name))


def test_a_gguf_imported_by_lowtune_exports_again(tiny, exports_root, tmp_path, monkeypatch):
    """Through lowtune's GGUF import and back: the folder has no tokenizer.model any more, so the SentencePiece
    scores are rebuilt from tokenizer.json's merge order; llama.cpp still tokenizes as lowtune does."""
    monkeypatch.setattr("lowtune.models.families.cache_root", lambda: tmp_path / "native")
    first = exported(tiny, "llama-spm", "f16", exports_root)
    imported = resolve_model_dir(str(first))
    assert not (imported / "tokenizer.model").exists()
    again = export(str(first), fmt="ollama", quant="f32", out_dir=tmp_path / "again")
    assert sorted(again.stop_ids) == [2, 1001] and again.template_name == "tokenizer"
    ids = prompt_ids(imported, PROMPTS[:4])
    exact = logits(hf_model(imported), ids[0])
    assert (logits(gguf_model(again.gguf), ids[0]) - exact).abs().max() < 1e-4 * exact.abs().max()
    llm = llama_cpp_model(again.gguf)
    try:
        modelfile = read_modelfile(again.modelfile)
        for prompt, expected in zip(PROMPTS[:4], ids):
            text = ollama_prompt(modelfile, [{"role": "user", "content": prompt}])
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, prompt
    finally:
        llm.close()


def test_llama3_rope_scaling_reaches_llama_cpp(micro_dir, tmp_path):
    """Llama 3.1's per-frequency rope factors (the rope_freqs tensor, which transformers' GGUF loader does not read)
    give llama.cpp the model's own logits over a prompt longer than the scaled wavelengths."""
    import numpy as np
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama31-tiny"
    tokenizer = AutoTokenizer.from_pretrained(micro_dir)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters=rope, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(4)
    _save_model(folder, LlamaForCausalLM(config), [tokenizer.eos_token_id])
    tokenizer.save_pretrained(folder)
    path = export(str(folder), quant="f32", out_dir=tmp_path / "out").gguf
    ids = prompt_ids(folder, [" ".join(PROMPTS[:10])])[0]
    assert len(ids) > 64
    llm = llama_cpp_model(path)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    exact = logits(hf_model(folder), ids).numpy()
    assert np.abs(theirs - exact).max() < 1e-3 * np.abs(exact).max()

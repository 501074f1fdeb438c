import hashlib
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowtune.models.builtin import build
from lowtune.templates import resolve_template


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name in ("model.safetensors", "tokenizer.json")}


def test_builds_are_identical(tmp_path):
    build("micro", tmp_path / "a")
    build("micro", tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert len(digest(tmp_path / "a")) == 2


def test_folder_loads_with_plain_transformers_and_template_renders(micro_dir):
    tok = AutoTokenizer.from_pretrained(micro_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    assert model.config.model_type == "llama"
    ids = tok("你是谁？Who are you?", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "你是谁？Who are you?"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    template = resolve_template("auto", tok, micro_dir)
    assert template.name == "tokenizer"
    assert tok.convert_tokens_to_ids("<|im_end|>") in template.stop_token_ids(tok)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))


def test_cached_folder_is_reused(micro_dir):
    from lowtune.models.builtin import builtin_path

    assert builtin_path("builtin:micro") == micro_dir
    assert str(micro_dir).startswith(os.environ["LOWTUNE_HOME"])

"""Each natively mapped family round-trips: a LoRA adapter on the converted folder merges into a standard folder
that plain transformers loads (no remote code) with the logits of base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from fakes.checkpoints import (make_baichuan2_checkpoint, make_internlm2_checkpoint, make_internlm_v1_checkpoint,
                               make_qwen2_checkpoint, make_qwen_v1_checkpoint)

from lowtune.cli import main
from lowtune.models.resolve import resolve_model_dir

FAMILIES = {
    "internlm-7b": lambda folder: make_internlm_v1_checkpoint(folder, bias=True),
    "internlm-20b": lambda folder: make_internlm_v1_checkpoint(folder, bias=False),
    "internlm2": make_internlm2_checkpoint,
    "qwen-v1": make_qwen_v1_checkpoint,
    "baichuan2": make_baichuan2_checkpoint,
    "qwen2": make_qwen2_checkpoint,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_on_a_converted_family_merges_into_a_plain_folder(tmp_path, family):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    original = tmp_path / family
    original.mkdir()
    FAMILIES[family](original)
    native = resolve_model_dir(str(original))
    base = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (tuned - plain).abs().max() > 1e-3  # the adapter changes the answer

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--base", str(original), "--dtype", "fp32", "-o", str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert "auto_map" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # no trust_remote_code
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert ((again - tuned).norm() / tuned.norm()).item() < 1e-4

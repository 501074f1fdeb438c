"""models/load.py: tokenizer padding, model loading (fp32 / real 4-bit), LoRA targets, parameter counts."""

from __future__ import annotations

import pytest

from lowtune.config import LoraSection
from lowtune.errors import UserError
from lowtune.models.load import (apply_lora, count_parameters, count_parameters_without_weights, load_model,
                                 load_tokenizer, lora_targets)


def test_tokenizer_pads_right_with_a_pad_token(micro_dir):
    tok = load_tokenizer(micro_dir)
    assert tok.padding_side == "right"
    assert tok.pad_token_id is not None


def test_tokenizer_without_pad_falls_back(micro_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "nopad"
    shutil.copytree(micro_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.pad_token == tok.eos_token or tok.pad_token == tok.unk_token


def test_model_loads_in_train_mode_fp32_on_cpu(micro_dir):
    import torch

    model = load_model(micro_dir, device="cpu")
    assert model.training and not model.config.use_cache
    assert next(model.parameters()).dtype == torch.float32


def test_lora_all_linear_skips_the_head_and_freezes_the_base(micro_dir):
    model = load_model(micro_dir, device="cpu")
    targets = lora_targets(model, "all-linear")
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    peft_model = apply_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    assert peft_model.training
    assert all(layer.gradient_checkpointing for layer in peft_model.get_base_model().model.layers)


def test_full_fine_tuning_trains_every_weight(micro_dir):
    model = apply_lora(load_model(micro_dir, device="cpu"), LoraSection(enabled=False), gradient_checkpointing=False)
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_unknown_lora_target_is_a_user_error(micro_dir):
    with pytest.raises(UserError, match="lora.targets"):
        apply_lora(load_model(micro_dir, device="cpu"), LoraSection(targets=["no_such_proj"]))


def test_dry_run_counts_match_the_loaded_model(micro_dir):
    lora = LoraSection(r=8, alpha=16, dropout=0.0)
    real = count_parameters(apply_lora(load_model(micro_dir, device="cpu"), lora))
    assert count_parameters_without_weights(micro_dir, lora) == real


def test_nf4_loads_real_4bit_layers_and_trains(micro_dir):
    import bitsandbytes as bnb
    import torch

    model = load_model(micro_dir, quantization="nf4", device="cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    model = apply_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))
    ids = torch.arange(2, 34).unsqueeze(0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_4bit_gradients_survive_an_eval_mode_generation(micro_dir):
    """Sample answers run in eval mode mid-training; the 4-bit layers must still pass gradients afterwards."""
    import torch

    from lowtune.generation import Sampling, answer
    from lowtune.templates import resolve_template

    def first_layer_grad(generate_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = apply_lora(load_model(micro_dir, quantization="nf4", device="cpu"),
                           LoraSection(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
        with torch.no_grad():  # B = 0 at init would zero every A gradient and hide the difference
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        if generate_first:
            tok = load_tokenizer(micro_dir)
            answer(model, tok, resolve_template("auto", tok, micro_dir), [{"role": "user", "content": "hi"}],
                   Sampling(max_new_tokens=3))
        assert model.training
        ids = torch.arange(2, 34).unsqueeze(0)
        model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                          if "layers.0." in n and p.requires_grad])

    torch.testing.assert_close(first_layer_grad(True), first_layer_grad(False))

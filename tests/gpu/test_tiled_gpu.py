"""The tiled MLP on CUDA inside compiled layers and the model's own checkpointing: loss and LoRA gradients equal the
untiled ones (bf16 autocast; tolerance 1e-2 relative on the loss, 5e-2 on gradients). Needs a GPU."""

from __future__ import annotations

import pytest
import torch

from lowtune.kernels import causal_lm_loss_sum, compile_layers
from lowtune.kernels.tiled import tile_mlps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def build(micro_dir, tiles: int, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tile_mlps(model, tiles)
    compile_layers(model)
    return model.train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_in_compiled_layers_matches_untiled(micro_dir, checkpointing):
    ids = torch.randint(0, 300, (1, 2048), generator=torch.Generator().manual_seed(3)).cuda()
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(2048, device="cuda")[None]}
    results = []
    for tiles in (1, 8):
        model = build(micro_dir, tiles, checkpointing)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = causal_lm_loss_sum(model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (tiled, tiled_grads) = results
    assert tiled == pytest.approx(plain, rel=1e-2)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=5e-2, atol=5e-2 * grad.abs().max().item(), msg=name)

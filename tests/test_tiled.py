"""Tiled MLP (kernels/tiled.py): a long row's loss and every gradient equal the untiled ones on a tiny model (CPU,
fp32; tolerance rtol 1e-5 / atol 1e-5, the order of fp32 summation), with and without the model's own gradient
checkpointing. With dropout the masks are drawn per tile (other numbers than one draw over the row), so there the
backward is checked against the same tiles run without checkpoints: recomputation replays the masks."""

import pytest
import torch

from lowtune.kernels import causal_lm_loss_sum
from lowtune.kernels.tiled import tile_mlps, tiled_forward


def lora_model(micro_dir, checkpointing: bool, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear",
                                             init_lora_weights=False))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def loss_and_grads(model, batch, seed: int = 5):
    torch.manual_seed(seed)  # the same dropout masks for both runs
    loss = causal_lm_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_keeps_loss_and_gradients(micro_dir, checkpointing):
    model = lora_model(micro_dir, checkpointing)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (1, 301), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(301)[None]}
    plain_loss, plain_grads = loss_and_grads(model, batch)
    assert tile_mlps(model, 7) == model.config.num_hidden_layers
    tiled_loss, tiled_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(tiled_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == tiled_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_tiles_recompute_one_slice_at_a_time_and_replay_dropout():
    seen: list[int] = []
    weight = torch.randn(8, 32, requires_grad=True)

    def mlp(x):
        seen.append(x.size(-2))
        return torch.nn.functional.dropout(torch.relu(x @ weight), 0.3) @ weight.t()

    x = torch.randn(1, 10, 8, requires_grad=True)
    torch.manual_seed(11)
    out = tiled_forward(mlp, 4)(x)
    assert seen == [3, 3, 2, 2]  # forward: one tile at a time
    out.square().sum().backward()
    assert seen[4:] == [2, 2, 3, 3]  # backward: each tile recomputed on its own, last first
    grads = x.grad.clone(), weight.grad.clone()
    weight.grad = None
    reference = x.detach().requires_grad_()
    torch.manual_seed(11)
    same = torch.cat([mlp(part) for part in reference.tensor_split(4, dim=-2)], dim=-2)
    torch.testing.assert_close(out, same)
    same.square().sum().backward()
    torch.testing.assert_close(grads[0], reference.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        seen.clear()
        tiled_forward(mlp, 4)(x)
    assert seen == [10]  # no gradients, no tiles (eval, sampling)


def test_plan_tiles_the_mlp_when_asked_or_for_long_rows(micro_dir):
    from lowtune.config import Config
    from lowtune.models.memory import MLP_TILE_TOKENS
    from lowtune.train.plan import plan_device, tiles_for

    asked = Config.model_validate({"train": {"batch_size": 1, "grad_accum": 1, "tiled_mlp": True}})
    plan = plan_device(asked, micro_dir, "cpu", 256)
    assert plan.mlp_tiles == 2 and "MLP in 2 sequence tiles" in plan.describe()
    assert plan_device(Config(), micro_dir, "cpu", 256).mlp_tiles == 1  # auto is off on CPU
    auto = Config()
    assert tiles_for(auto, MLP_TILE_TOKENS, 4, auto=True) == 1  # rows of ordinary length never tile
    assert tiles_for(auto, 4 * MLP_TILE_TOKENS + 1, 1, auto=True) == 5
    off = Config.model_validate({"train": {"tiled_mlp": False}})
    assert tiles_for(off, 10 * MLP_TILE_TOKENS, 1, auto=True) == 1


def test_forecast_counts_one_tile_of_mlp_intermediates():
    from lowtune.models.memory import MLP_TILE_TOKENS, Shape, candidate_plan, layer_activation_bytes
    from lowtune.models.memory import Setting as S

    shape = Shape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
    short, long = (layer_activation_bytes(shape, n, tiled=True) for n in (MLP_TILE_TOKENS, 8 * MLP_TILE_TOKENS))
    assert short == 2 * (16 * 4096 + 6 * 14336) * MLP_TILE_TOKENS
    assert long - short == 2 * 16 * 4096 * 7 * MLP_TILE_TOKENS  # only the hidden-wide part grows past one tile
    assert layer_activation_bytes(shape, 8 * MLP_TILE_TOKENS) > long  # untiled
    # the planner prices it: a long row is forecast tiled (less memory, one more MLP forward)
    row, rows = (candidate_plan(shape, S("nf4", 32, "adamw", m, n, True, True), capacity_bytes=80 * 2**30,
                                rows_per_step=m) for m, n in ((1, 2 * MLP_TILE_TOKENS), (2, MLP_TILE_TOKENS)))
    assert row.breakdown["activations"] < rows.breakdown["activations"] and row.tokens_per_s < rows.tokens_per_s

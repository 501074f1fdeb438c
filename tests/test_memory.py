"""The memory forecast/plan: calibrated against measured H200 peaks, and the plan's choices."""

import pytest

from lowtune.models.memory import GIB, Shape, forecast, plan_memory

LLAMA2_7B = Shape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)


def test_shape_counts_match_the_published_model():
    assert LLAMA2_7B.linear_params + LLAMA2_7B.embedding_params == pytest.approx(6.74e9, rel=0.01)
    gqa = Shape.from_config({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100})
    assert gqa.kv_dim == 32


@pytest.mark.parametrize("tokens, checkpointing, measured_gib", [
    (8192, False, 72.9),  # QLoRA r64, batch 4 x 2048, fused kernels, no checkpointing (bench/probe log)
    (2048, True, 6.81),   # QLoRA r64, batch 1 x 2048, fused kernels, checkpointing
])
def test_forecast_is_within_10_percent_of_measured_peaks(tokens, checkpointing, measured_gib):
    parts = forecast(LLAMA2_7B, quantization="nf4", lora_r=64, optimizer="adamw", tokens=tokens,
                     checkpointing=checkpointing, offload=False)
    assert sum(parts.values()) / GIB == pytest.approx(measured_gib, rel=0.10)


def test_offloaded_plan_keeps_the_input_embedding_table_off_the_gpu():
    common = dict(quantization="nf4", lora_r=64, optimizer="paged_adamw_8bit", tokens=4096, checkpointing=True)
    kept, offloaded = forecast(LLAMA2_7B, offload=False, **common), forecast(LLAMA2_7B, offload=True, **common)
    assert kept["weights"] - offloaded["weights"] == 32000 * 4096 * 2
    tied = Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=100, tied=True)
    assert forecast(tied, offload=True, **common)["weights"] == forecast(tied, offload=False, **common)["weights"]


def test_plan_prefers_no_checkpointing_on_a_big_gpu():
    plan = plan_memory(LLAMA2_7B, capacity_bytes=100 * GIB, seq_len=2048, rows_per_step=16, quantization="nf4",
                       lora_r=64)
    assert (plan.checkpointing, plan.micro_batch, plan.grad_accum, plan.optimizer) == (False, 4, 4, "adamw")
    assert plan.fits


def test_plan_gets_lean_on_a_small_gpu():
    plan = plan_memory(LLAMA2_7B, capacity_bytes=6 * GIB, seq_len=2048, rows_per_step=16, quantization="nf4",
                       lora_r=64)
    assert plan.fits
    assert (plan.checkpointing, plan.offload, plan.micro_batch, plan.optimizer) == (True, True, 2, "paged_adamw_8bit")


def test_plan_says_when_nothing_fits():
    plan = plan_memory(LLAMA2_7B, capacity_bytes=3 * GIB, seq_len=2048, rows_per_step=16, quantization="nf4",
                       lora_r=64)
    assert not plan.fits and "forecast peak" in plan.describe()


def test_plan_keeps_the_choices_the_config_fixes_and_forecasts_them():
    common = dict(capacity_bytes=int(6.4 * GIB), seq_len=2048, rows_per_step=16, quantization="nf4", lora_r=64)
    auto = plan_memory(LLAMA2_7B, **common)
    doubled = plan_memory(LLAMA2_7B, micro_batch=4, **common)
    assert doubled.micro_batch == 4 and doubled.grad_accum == 4
    assert doubled.peak_bytes > auto.peak_bytes  # the forecast is of the micro-batch that will run
    kept = plan_memory(LLAMA2_7B, checkpointing=True, offload=False, optimizer="adamw", **common)
    assert (kept.checkpointing, kept.offload, kept.optimizer) == (True, False, "adamw")
    assert not plan_memory(LLAMA2_7B, checkpointing=False, offload=True, **common).offload  # needs checkpointing

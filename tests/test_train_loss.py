"""Loss invariants of the training loop: it equals a plain transformers forward, batch x accumulation does not
change the update, packing does not leak between samples, checkpointing is really on."""

from __future__ import annotations

import copy

import pytest
import torch

from lowtune.config import Config, LoraSection, TrainSection
from lowtune.data.collate import collate, target_count
from lowtune.data.dataset import DataSummary, TrainData
from lowtune.data.encode import encode_conversation
from lowtune.data.pack import pack_samples
from lowtune.kernels import causal_lm_loss_sum
from lowtune.models.load import apply_lora, load_model, load_tokenizer
from lowtune.templates import resolve_template
from lowtune.train.batches import StepPlan
from lowtune.train.loop import train_step
from lowtune.train.optim import build_scheduler
from lowtune.train.plan import DevicePlan
from lowtune.train.state import RunState

PLAIN_PLAN = DevicePlan(micro_batch=1, grad_accum=1, checkpointing=False, offload=False, optimizer="adamw",
                        compile=False, attention="sdpa", flat_batches=False)

CONVERSATIONS = [
    [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小明，一个人工智能助手。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I'm Lumi."}],
    [{"role": "user", "content": "Name three colours of the rainbow, please."},
     {"role": "assistant", "content": "Red, orange and yellow are three of the seven colours."},
     {"role": "user", "content": "And the rest?"}, {"role": "assistant", "content": "Green, blue, indigo, violet."}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
    [{"role": "user", "content": "Translate 'cat' into Chinese."}, {"role": "assistant", "content": "猫"}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello! Nice to meet you, friend."}],
    [{"role": "user", "content": "上海有什么景点？"}, {"role": "assistant", "content": "外滩、豫园和东方明珠。"}],
    [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye, see you soon!"}],
]


@pytest.fixture(scope="module")
def tokenizer(micro_dir):
    return load_tokenizer(micro_dir)


@pytest.fixture(scope="module")
def samples(micro_dir, tokenizer):
    template = resolve_template("auto", tokenizer, micro_dir)
    out = [encode_conversation(m, tokenizer, template, 256) for m in CONVERSATIONS]
    assert all(out) and len({len(s["input_ids"]) for s in out}) > 4  # lengths differ: padding matters
    return out


@pytest.fixture(scope="module")
def lora_model(micro_dir):
    torch.manual_seed(0)
    model = apply_lora(load_model(micro_dir, device="cpu"), LoraSection(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # non-zero B so the adapter changes the forward pass and gets full gradients
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_loss_equals_plain_transformers_forward(micro_dir, tokenizer, samples):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).eval()
    ours = load_model(micro_dir, device="cpu").eval()
    for sample in samples[:3]:
        batch = collate([sample], tokenizer.pad_token_id)
        with torch.no_grad():
            reference = plain(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            mine = causal_lm_loss_sum(ours, batch) / target_count(batch)
        assert abs(mine.item() - reference.item()) / reference.item() < 1e-5


def step_state(model, accelerator, tokenizer, rows, lr=1.0, max_grad_norm=0.0, plan=PLAIN_PLAN) -> RunState:
    """What train_step reads: `model` with SGD(lr) on a constant schedule, `rows` as the training data."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = build_scheduler(optimizer, TrainSection(scheduler="constant", warmup_ratio=0.0), 1)
    cfg = Config.model_validate({"train": {"max_grad_norm": max_grad_norm}})
    return RunState(cfg=cfg, run=None, accelerator=accelerator, plan=plan, steps=None,
                    data=TrainData(rows, [], DataSummary()), tokenizer=tokenizer, template=None, model=model,
                    optimizer=optimizer, scheduler=scheduler)


def _update(model, accelerator, tokenizer, rows, window):
    """Parameters after one SGD(lr=1) step: the difference from the start is exactly the gradient."""
    model = copy.deepcopy(model)
    loss, grad_norm, _ = train_step(step_state(model, accelerator, tokenizer, rows), window)
    return loss, grad_norm, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_batch_times_accumulation_invariance(lora_model, accelerator, tokenizer, samples):
    big = _update(lora_model, accelerator, tokenizer, samples, [list(range(8))])               # batch 8 x accum 1
    small = _update(lora_model, accelerator, tokenizer, samples, [[i] for i in range(8)])      # batch 1 x accum 8
    mixed = _update(lora_model, accelerator, tokenizer, samples, [[0, 1, 2], [3, 4], [5, 6, 7]])
    for other in (small, mixed):
        assert other[0] == pytest.approx(big[0], rel=1e-5)
        assert other[1] == pytest.approx(big[1], rel=1e-4)
        for a, b in zip(big[2], other[2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_naive_per_micro_batch_mean_would_differ(lora_model, tokenizer, samples):
    """Guard for the test above: averaging per-micro-batch means gives another loss on these lengths."""
    with torch.no_grad():
        means = [causal_lm_loss_sum(lora_model, collate([s], tokenizer.pad_token_id)).item()
                 / target_count(collate([s], tokenizer.pad_token_id)) for s in samples]
        batch = collate(samples, tokenizer.pad_token_id)
        token_mean = causal_lm_loss_sum(lora_model, batch).item() / target_count(batch)
    assert abs(sum(means) / len(means) - token_mean) > 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(lora_model, tokenizer, samples, attention):
    model = copy.deepcopy(lora_model).eval()
    model.get_base_model().set_attn_implementation(attention)
    rows = pack_samples(samples, 512, seed=1)
    assert len(rows) < len(samples)  # several samples really share a row
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        packed = causal_lm_loss_sum(model, collate(rows, pad)).item()
        unpacked = sum(causal_lm_loss_sum(model, collate([s], pad)).item() for s in samples)
        leaky = collate(rows, pad)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
        leaked = causal_lm_loss_sum(model, leaky).item()
    assert packed == pytest.approx(unpacked, rel=1e-5)
    assert abs(leaked - unpacked) / unpacked > 1e-3  # without isolation the test would fail


def test_step_plan_covers_each_row_once_per_epoch():
    plan = StepPlan(num_rows=23, batch_size=4, grad_accum=2, seed=3)
    seen = [i for step in range(1, plan.steps_per_epoch + 1) for micro in plan.window(step) for i in micro]
    assert sorted(seen) == list(range(23))
    assert plan.window(plan.steps_per_epoch + 1) != plan.window(1)  # the next epoch reshuffles
    assert plan.total_steps(epochs=2.5, max_steps=None) == 8 and plan.total_steps(3, max_steps=5) == 5


def test_checkpointing_is_active_while_training(lora_model, accelerator, tokenizer, samples, micro_dir):
    """Activation checkpointing only runs in train mode; it must stay on after sample generation (eval mode)."""
    from lowtune.generation import Sampling, answer

    model = copy.deepcopy(lora_model).train()
    template = resolve_template("auto", tokenizer, micro_dir)
    answer(model, tokenizer, template, [{"role": "user", "content": "hi"}], Sampling(max_new_tokens=2))
    calls = []
    layers = model.get_base_model().model.layers
    for layer in layers:
        original = layer._gradient_checkpointing_func

        def counting(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    train_step(step_state(model, accelerator, tokenizer, samples, lr=0.0, max_grad_norm=1.0), [[0, 1]])
    assert len(calls) == len(layers)

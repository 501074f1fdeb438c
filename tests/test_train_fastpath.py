"""The device plan and the fast-path batches: padding-free rows and activation offload change speed and memory,
never the loss or the update."""

from __future__ import annotations

import copy

import pytest
import torch

from lowtune.config import Config
from lowtune.data.collate import collate, collate_flat, target_count
from lowtune.data.pack import pack_samples
from lowtune.errors import UserError
from lowtune.kernels import causal_lm_loss_sum
from lowtune.train.loop import train_step
from lowtune.train.plan import DevicePlan, plan_device

from test_train_loss import CONVERSATIONS, PLAIN_PLAN, lora_model, samples, step_state, tokenizer  # noqa: F401


def test_padding_free_batch_gives_the_padded_loss(lora_model, tokenizer, samples):
    model = copy.deepcopy(lora_model).eval()
    rows = pack_samples(samples, 160, seed=0)
    assert any(len(r["seq_lens"]) > 1 for r in rows)
    with torch.no_grad():
        padded = causal_lm_loss_sum(model, collate(rows, tokenizer.pad_token_id))
        flat_batch = collate_flat(rows)
        flat = causal_lm_loss_sum(model, flat_batch)
    assert flat_batch["input_ids"].shape[0] == 1
    assert flat_batch["cu_seq_lens_q"].tolist()[-1] == sum(len(r["input_ids"]) for r in rows)
    assert len(flat_batch["cu_seq_lens_q"]) == sum(len(r["seq_lens"]) for r in rows) + 1
    assert target_count(flat_batch) == target_count(collate(rows, tokenizer.pad_token_id))
    torch.testing.assert_close(flat, padded, rtol=1e-5, atol=1e-5)


def _step(model, accelerator, tokenizer, rows, plan):
    model = copy.deepcopy(model)
    state = step_state(model, accelerator, tokenizer, rows, plan=plan)
    loss, norm, _ = train_step(state, [[0, 1, 2], [3, 4, 5, 6, 7]])
    return loss, norm, [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("flat, offload", [(True, False), (False, True)])
def test_fast_path_steps_equal_the_plain_step(lora_model, tokenizer, samples, flat, offload):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    plain = _step(lora_model, accelerator, tokenizer, samples, PLAIN_PLAN)
    plan = DevicePlan(micro_batch=1, grad_accum=8, checkpointing=offload, offload=offload, optimizer="adamw",
                      compile=False, attention="sdpa", flat_batches=flat)
    model = copy.deepcopy(lora_model)
    if offload:  # the memory-tight plan: layer inputs and the input embedding table live on the host
        from lowtune.models.load import enable_checkpointing
        from lowtune.models.placement import HostEmbedding

        enable_checkpointing(model)
        base = model.get_base_model()
        base.set_input_embeddings(HostEmbedding(base.get_input_embeddings()))
    fast = _step(model, accelerator, tokenizer, samples, plan)
    assert fast[0] == pytest.approx(plain[0], rel=1e-5)
    assert fast[1] == pytest.approx(plain[1], rel=1e-4) and fast[1] > 0
    for a, b in zip(plain[2], fast[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_input_embeddings_go_to_the_host_only_when_frozen_untied_and_on_a_gpu(lora_model):
    from lowtune.models.placement import HostEmbedding, keep_input_embeddings_on_host

    model = copy.deepcopy(lora_model)
    assert keep_input_embeddings_on_host(model) == 0  # already on the CPU: nothing to free
    base = model.get_base_model()
    table = base.get_input_embeddings()
    host = HostEmbedding(table)
    ids = torch.tensor([[1, 5, 7, 2]])
    torch.testing.assert_close(host(ids), table(ids), rtol=0, atol=0)
    assert not list(host.parameters()) and host.output_device == table.weight.device
    table.weight.requires_grad_(True)  # trainable (full fine-tuning): stays where it is
    assert keep_input_embeddings_on_host(model) == 0


def test_cpu_plan_takes_the_config_as_written(micro_dir):
    cfg = Config.model_validate({"train": {"batch_size": 2, "grad_accum": 3}})
    plan = plan_device(cfg, micro_dir, "cpu", 256)
    assert (plan.micro_batch, plan.grad_accum, plan.checkpointing, plan.offload) == (2, 3, False, False)
    assert (plan.optimizer, plan.compile, plan.flat_batches) == ("adamw", False, False)
    cfg = Config.model_validate({"train": {"batch_size": 2, "grad_accum": 3, "micro_batch": 3,
                                           "gradient_checkpointing": True, "optimizer": "adamw_8bit"}})
    plan = plan_device(cfg, micro_dir, "cpu", 256)
    assert (plan.micro_batch, plan.grad_accum, plan.checkpointing, plan.optimizer) == (3, 2, True, "adamw_8bit")


def test_plan_picks_and_names_the_loss_path_and_sharding_once(micro_dir, lora_model):
    plan = plan_device(Config(), micro_dir, "cpu", 256)
    assert (plan.loss, plan.sharded) == ("chunked", False) and "chunked linear cross-entropy" in plan.describe()
    assert plan.for_model(lora_model) is plan  # a plain bias-free head: no logits needed
    fsdp = Config.model_validate({"train": {"distributed": "fsdp"}, "model": {"quantization": "none"}})
    assert not plan_device(fsdp, micro_dir, "cpu", 256).sharded  # one process holds whole weights
    sharded = plan_device(fsdp, micro_dir, "cpu", 256, processes=2)
    assert (sharded.loss, sharded.sharded) == ("logits", True)
    assert "sharded over 2 processes (FSDP)" in sharded.describe()
    model = copy.deepcopy(lora_model)
    head = model.get_base_model().lm_head
    model.get_base_model().lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    assert plan.for_model(model).loss == "logits"  # a head with a bias goes through the model's own forward
    with pytest.raises(UserError, match="fp16 loss scaling is not sharded"):
        plan_device(fsdp.model_copy(update={"model": fsdp.model.model_copy(update={"dtype": "fp16"})}), micro_dir,
                    "cpu", 256, processes=2)


def test_micro_batch_must_divide_the_rows_per_step(micro_dir):
    cfg = Config.model_validate({"train": {"batch_size": 2, "grad_accum": 3, "micro_batch": 4}})
    with pytest.raises(UserError, match="must divide"):
        plan_device(cfg, micro_dir, "cpu", 256)


@pytest.mark.parametrize("capability, compiled", [((6, 1), False), ((7, 5), True), ((9, 0), True)])
def test_gpu_plan_compiles_only_where_triton_runs(micro_dir, monkeypatch, capability, compiled):
    from lowtune.train import plan as plan_module

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    cfg = Config.model_validate({"train": {"batch_size": 1, "grad_accum": 4}, "model": {"quantization": "nf4"}})
    plan = plan_module._gpu_plan(cfg, micro_dir, 256, capacity=4 * 2**30)
    assert plan.compile is compiled
    assert plan_module._gpu_plan(Config.model_validate({"train": {"compile": True}}), micro_dir, 256,
                                 capacity=4 * 2**30).compile  # asked for: honoured

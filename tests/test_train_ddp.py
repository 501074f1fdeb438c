"""`--nproc 2` (torchrun, DDP on CPU through gloo): 2 processes x batch 1 give the losses of 1 process x batch 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lowtune.config import load_config
from lowtune.train import train


def write_setup(tmp_path: Path, out: str) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"question {i}?" + " more" * (i % 5)},
                          {"role": "assistant", "content": f"Answer {i}." + " again" * (i % 3)}]} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "model": {"path": "builtin:micro", "quantization": "none"},
        "data": {"train": str(data), "max_length": 64, "packing": False, "eval": 0.25},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 3.0e-3, "save_every": 100},
        "eval": {"every": 2, "prompts": []},
        "log": {"to": []},
        "output": {"dir": str(tmp_path / out)},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def metrics(run: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    train(load_config(str(write_setup(tmp_path, "single"))))
    config = write_setup(tmp_path, "ddp")
    proc = subprocess.run([sys.executable, "-m", "lowtune.cli", "train", str(config), "train.batch_size=1",
                           "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, ddp = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(ddp[0]) == 4 and len(ddp[1]) == 3
    assert ddp[0] == pytest.approx(single[0], rel=1e-4)
    assert ddp[1] == pytest.approx(single[1], rel=1e-4)
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()


def test_torchrun_command_follows_the_usual_variables():
    from lowtune.errors import UserError
    from lowtune.train.launch import needs_launch, requested_processes, torchrun_command

    assert requested_processes(None, {"NPROC_PER_NODE": "4"}) == 4 and requested_processes(2, {}) == 2
    assert not needs_launch(1, {}) and needs_launch(2, {}) and needs_launch(1, {"NNODES": "2"})
    single = torchrun_command(2, ["cfg.yaml"], {})
    assert "--standalone" in single and "--nproc-per-node=2" in single and single[-2:] == ["train", "cfg.yaml"]
    multi = torchrun_command(8, ["cfg.yaml"], {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"})
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"} <= set(multi)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        torchrun_command(8, ["cfg.yaml"], {"NNODES": "2"})
    with pytest.raises(UserError, match="NPROC_PER_NODE"):
        requested_processes(None, {"NPROC_PER_NODE": "two"})


def test_sharded_strategies_are_refused_rather_than_ignored(tmp_path):
    from lowtune.errors import UserError

    with pytest.raises(UserError, match="train.distributed=zero3 is not available yet"):  # the schema refuses it
        load_config(str(write_setup(tmp_path, "zero")), ["train.distributed=zero3"])
    with pytest.raises(UserError, match="QLoRA trains on several GPUs with train.distributed=ddp"):
        load_config(str(write_setup(tmp_path, "qfsdp")), ["train.distributed=fsdp", "model.quantization=nf4"])
    cfg = load_config(str(write_setup(tmp_path, "qfsdp")))
    cfg.model.quantization = "nf4"  # set in code after loading: train checks the combination again
    cfg.train.distributed = "fsdp"
    with pytest.raises(UserError, match="QLoRA trains on several GPUs with train.distributed=ddp"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("method, overrides", [("lora", []), ("full", ["lora.enabled=false", "train.lr=1e-4"]),
                                               ("lora", ["train.compile=true"])])  # compiled layers inside FSDP units
def test_sharded_two_processes_match_one_and_resume(tmp_path, method, overrides):
    """train.distributed=fsdp (FSDP2 over gloo): the losses of one process, weights that load with plain
    transformers/peft, and a resume from a mid-run checkpoint that repeats the uninterrupted run's last steps."""
    from transformers import AutoModelForCausalLM

    from lowtune.models.builtin import builtin_path

    train(load_config(str(write_setup(tmp_path, "single")), overrides))
    config = write_setup(tmp_path, "fsdp")
    command = [sys.executable, "-m", "lowtune.cli", "train", str(config), "train.batch_size=1", *overrides,
               "train.distributed=fsdp", "train.save_every=2", "train.save_limit=2", "--nproc", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded over 2 processes (FSDP)" in proc.stdout
    single, sharded = metrics(tmp_path / "single"), metrics(tmp_path / "fsdp")
    assert len(sharded[0]) == 4 and len(sharded[1]) == 3
    assert sharded[0] == pytest.approx(single[0], rel=1e-4)
    assert sharded[1] == pytest.approx(single[1], rel=1e-4)

    base = AutoModelForCausalLM.from_pretrained(builtin_path("builtin:micro"))
    if method == "lora":
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, tmp_path / "fsdp" / "adapter").merge_and_unload()
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_path("builtin:micro")),
                                              tmp_path / "single" / "adapter").merge_and_unload()
    else:
        tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "model")
    ids = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, reference(ids).logits, rtol=1e-3, atol=1e-4)
        assert not torch.allclose(tuned(ids).logits, base(ids).logits if method == "full" else
                                  AutoModelForCausalLM.from_pretrained(builtin_path("builtin:micro"))(ids).logits)

    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-2"
    weight_files = {path.name for path in checkpoint.rglob("*.safetensors")}
    assert weight_files == ({"adapter_model.safetensors", "trainable_full.safetensors"} if method == "lora" else
                            {"model.safetensors"})  # a full model's weights are stored once
    proc = subprocess.run([*command, "--resume", str(checkpoint)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {checkpoint} at step 2" in proc.stdout.replace("\n", "")
    resumed = metrics(tmp_path / "fsdp")
    assert resumed[0] == pytest.approx(sharded[0], rel=1e-4) and resumed[1] == pytest.approx(sharded[1], rel=1e-4)

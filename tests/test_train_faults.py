"""Numerical faults (issue 19): a NaN/inf loss or gradient norm stops training before that update is applied, with
one line naming the step and the last good checkpoint, and `--resume auto` continues; running out of memory
(simulated on CPU by raising torch.OutOfMemoryError inside a step) prints the plan that ran, the measured peak and
the `lowtune estimate` advice. Both exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fakes.runs import micro_run_config
from safetensors.torch import load_file

from lowtune.cli import main
from lowtune.train import loop

TOTAL = 8


def write_config(tmp_path: Path) -> Path:
    return micro_run_config(tmp_path, "run", 8, {"max_steps": TOTAL, "save_every": 2}, config_name="cfg.yaml",
                            answer="Answer {i} from Lumi.", lora={"dropout": 0.0})


def fail_at(monkeypatch: pytest.MonkeyPatch, step: int, fault) -> None:
    """Make training step `step` (one micro-batch per step here) go wrong the way `fault(loss)` says."""
    real = loop.causal_lm_loss_sum
    calls = {"n": 0}

    def patched(model, batch, path):
        loss = real(model, batch, path)
        if model.training:
            calls["n"] += 1
            if calls["n"] == step:
                return fault(loss)
        return loss

    monkeypatch.setattr(loop, "causal_lm_loss_sum", patched)


def stderr_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def step_rows(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def complete(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())


def finite_adapter(checkpoint: Path) -> bool:
    tensors = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    return all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_resumes(tmp_path, monkeypatch, capsys, kind):
    config, run = write_config(tmp_path), tmp_path / "run"
    fail_at(monkeypatch, 5, lambda loss: loss * float(kind))
    assert main(["train", str(config)]) == 2
    line = stderr_line(capsys)
    assert f"step 5: the loss is {kind}" in line and "step-4" in line and "train.lr" in line, line
    assert complete(run) == [2, 4] and step_rows(run) == [1, 2, 3, 4]
    assert finite_adapter(run / "checkpoints" / "step-4")
    monkeypatch.undo()
    assert main(["train", str(config), "--resume", "auto"]) == 0
    assert step_rows(run) == list(range(1, TOTAL + 1)) and complete(run) == [6, 8]
    losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses if x is not None)


def test_an_infinite_gradient_norm_without_loss_scaling_stops_too(tmp_path, monkeypatch, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    real, calls = loop.clip_gradients, {"n": 0}

    def clip(accelerator, model, max_norm):
        calls["n"] += 1
        return math.inf if calls["n"] == 3 else real(accelerator, model, max_norm)

    monkeypatch.setattr(loop, "clip_gradients", clip)
    assert main(["train", str(config)]) == 2
    line = stderr_line(capsys)
    assert "step 3: the gradient norm is inf" in line and "step-2" in line, line
    assert complete(run) == [2] and step_rows(run) == [1, 2]


def test_out_of_memory_prints_the_plan_the_peak_and_the_estimate_advice(tmp_path, monkeypatch, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"

    def oom(_loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fail_at(monkeypatch, 3, oom)
    assert main(["train", str(config)]) == 2
    line = stderr_line(capsys)
    for part in ("out of memory at step 3", "micro-batch 2 x accumulation 1", "measured peak",
                 f"lowtune estimate {run / 'config.yaml'}", "data.max_length", "step-2", "--resume auto"):
        assert part in line, (part, line)
    peak = float(line.split("measured peak ")[1].split(" GiB")[0])
    assert peak > 0
    assert complete(run) == [2]


def test_a_bug_is_still_an_internal_error(tmp_path, monkeypatch, capsys):
    """Only the faults above become one-line errors: anything else keeps its traceback (exit 1)."""
    config = write_config(tmp_path)

    def bug(_loss):
        raise KeyError("a bug")

    fail_at(monkeypatch, 2, bug)
    assert main(["train", str(config)]) == 1
    assert "internal error: KeyError" in capsys.readouterr().err


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    from lowtune.train import checkpoint

    config, run = write_config(tmp_path), tmp_path / "run"
    real, saves = checkpoint.save_trained, {"n": 0}

    def fill_disk(model, folder, *args, **kwargs):
        real(model, folder, *args, **kwargs)  # the adapter is written, then the disk is full
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.bin"))

    monkeypatch.setattr(checkpoint, "save_trained", fill_disk)
    assert main(["train", str(config)]) == 2
    line = stderr_line(capsys)
    assert "no space left while writing checkpoint step-4" in line and "step-2 is intact" in line, line
    assert "GiB free" in line and "--resume auto" in line
    assert complete(run) == [2] and finite_adapter(run / "checkpoints" / "step-2")
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # space given back
    monkeypatch.undo()
    assert main(["train", str(config), "--resume", "auto"]) == 0
    assert step_rows(run) == list(range(1, TOTAL + 1))


def test_disk_full_anywhere_else_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from lowtune.data import convert

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.jsonl"))

    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    monkeypatch.setattr(convert, "write_jsonl", full)
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "no space left on the disk writing" in stderr_line(capsys)

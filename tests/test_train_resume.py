"""Kill training at many moments (SIGKILL mid-step, mid-checkpoint, before the COMPLETE marker, during pruning;
Ctrl-C), resume each time with --resume auto: the run ends at the same step with the loss curve of a run that was
never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.runs import micro_run_config

from lowtune.config import load_config
from lowtune.train import train

TOTAL = 16

# Runs lowtune's CLI in a subprocess, optionally SIGKILLing itself at an exact point of a checkpoint write.
RUNNER = r"""
import os, signal, sys
import lowtune.train.checkpoint as ck

mode = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def after(original):
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        die()
    return wrapped

if mode == "before-marker":
    write = ck.atomic_write_text
    ck.atomic_write_text = lambda path, text: die() if path.name == "COMPLETE" else write(path, text)
elif mode == "mid-state":
    ck.save_trained = after(ck.save_trained)          # adapter written, optimizer/RNG/marker not yet
elif mode == "during-prune":
    ck.prune = after(ck.prune)                         # renamed into place, older ones not yet deleted
from lowtune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def write_setup(tmp_path: Path, out: str) -> Path:
    # dropout: resumed RNG state must match too
    return micro_run_config(tmp_path, out, 16, {"max_steps": TOTAL, "grad_accum": 2, "save_every": 2},
                            data={"max_length": 64, "eval": 0.25},
                            eval={"every": 8, "prompts": ["question 1?"], "max_new_tokens": 3})


def start(config: Path, mode: str = "none", resume: bool = True) -> subprocess.Popen:
    args = [sys.executable, "-c", RUNNER, mode, "train", str(config)] + (["--resume", "auto"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def step_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in rows if "loss" in r]


def signal_after_rows(proc: subprocess.Popen, run: Path, rows: int, sig: int) -> None:
    before = len(step_rows(run))
    deadline = time.time() + 120
    while len(step_rows(run)) < before + rows:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.01)
    proc.send_signal(sig)


def complete_steps(run: Path) -> list[int]:
    found = []
    for child in (run / "checkpoints").glob("step-*"):
        assert (child / "COMPLETE").is_file(), f"{child} is visible but incomplete"
        found.append(int(child.name.split("-")[1]))
    return sorted(found)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = train(load_config(str(write_setup(tmp_path, "reference"))))
    config = write_setup(tmp_path, "run")
    run = tmp_path / "run"

    proc = start(config, resume=False)                      # 1. SIGKILL from outside, mid-training
    signal_after_rows(proc, run, 3, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    progress = [complete_steps(run)]

    for mode in ("before-marker", "mid-state", "during-prune"):  # 2-4. SIGKILL inside a checkpoint write
        proc = start(config, mode)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == -signal.SIGKILL, out
        progress.append(complete_steps(run))
        if mode != "during-prune":
            assert progress[-1] == progress[-2], f"{mode}: an unfinished checkpoint became visible"
    assert max(progress[-1]) > max(progress[-2])          # the pruned-while-killed one was complete: kept

    proc = start(config)                                    # 5. Ctrl-C: finish the step, checkpoint, exit 130
    signal_after_rows(proc, run, 2, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    last = step_rows(run)[-1]["step"]
    assert last in complete_steps(run) and last < TOTAL

    proc = start(config)                                    # 6. finish
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out

    rows = step_rows(run)
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
    resumed = [r["loss"] for r in rows]
    assert resumed == pytest.approx(reference.losses, rel=1e-4)
    assert complete_steps(run) == [TOTAL - 2, TOTAL]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    samples = [json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples == [0, 8, TOTAL]
    assert os.path.getsize(run / "loss.png") > 0


def test_resume_takes_only_complete_checkpoints(tmp_path):
    from lowtune.errors import UserError
    from lowtune.runs import RunFolder
    from lowtune.train.checkpoint import find_resume

    run = RunFolder(tmp_path / "run")
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = run.checkpoint_dir(step)
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        if complete:
            (folder / "COMPLETE").write_text("")
    (run.checkpoints_dir / ".step-8.tmp").mkdir()
    assert find_resume(run, None) is None
    assert find_resume(run, "auto") == run.checkpoint_dir(4)
    assert find_resume(run, str(run.root)) == run.checkpoint_dir(4)
    assert find_resume(run, str(run.checkpoint_dir(2))) == run.checkpoint_dir(2)
    with pytest.raises(UserError, match="incomplete"):
        find_resume(run, str(run.checkpoint_dir(6)))
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_resume(run, str(tmp_path / "elsewhere"))

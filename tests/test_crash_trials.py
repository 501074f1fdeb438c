"""Crash safety under random kills (issue 19): SIGKILL `lowtune train --resume auto` at seeded random moments (start
up, mid-step, inside checkpoint writes), again and again on one run folder; after every kill each visible checkpoint
is complete, every resume starts from the newest complete one, and the finished run has every step once with the
losses and learning rates of a run that was never interrupted. Merge and export are killed the same way: their
output folder is either absent or complete.

Training runs in children forked from one "zygote" process that imported torch/transformers once (no compute before
the fork, so no thread pools are copied), which keeps a trial at about a second on 2 CPU cores. Deterministic kill
points (before the COMPLETE marker, mid-state, during pruning, Ctrl-C) are in tests/test_train_resume.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fakes.runs import micro_run_config

TRIALS = 24
OUTPUT_TRIALS = 8
TOTAL = 80  # a trial advances at most 3 steps: 24 trials never finish the run
SEED = 19

ZYGOTE = r"""
import json, os, sys
import torch, transformers, peft, accelerate  # imported once, shared by every forked child
import lowtune.cli, lowtune.train.loop, lowtune.export.merge, lowtune.export.gguf

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os._exit(lowtune.cli.main(argv))
    print(json.dumps({"pid": pid, "started": __import__("time").time()}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
"""


class Zygote:
    """Runs lowtune commands in children forked from one process that has imported everything once."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        assert self._read(900) == {"ready": True}, "the zygote did not finish its imports"  # slow on a busy CI box

    def _read(self, timeout: float | None) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def run(self, argv: list[str], log: Path, kill: Callable[[float], bool] | None = None) -> tuple[bool, int]:
        """(killed, exit code or -signal); `kill(seconds since the fork)` is asked every 10 ms whether to SIGKILL."""
        self.proc.stdin.write(json.dumps([argv, str(log)]) + "\n")
        pid = self._read(120)["pid"]
        started, done = time.time(), None
        while done is None:
            done = self._read(0.01)
            if done is None and kill is not None and kill(time.time() - started):
                with contextlib.suppress(ProcessLookupError):  # it ended and was reaped between the two checks
                    os.kill(pid, signal.SIGKILL)
                done = self._read(60)
            assert time.time() - started < 300, "the command hangs"
        code = os.waitstatus_to_exitcode(done["status"])
        return code == -signal.SIGKILL, code

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def write_setup(tmp_path: Path, out: str) -> Path:
    # dropout: the resumed RNG state must match too
    return micro_run_config(tmp_path, out, 12, {"max_steps": TOTAL, "save_every": 1})


def step_rows(run: Path) -> list[dict]:
    rows = []
    path = run / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # torn by the kill: resume cuts it away
            pass
    return [r for r in rows if "loss" in r]


def visible_checkpoints(run: Path) -> list[int]:
    """Steps of the checkpoint folders a reader can see; each must be complete and loadable."""
    from safetensors.torch import load_file

    found = []
    for folder in (run / "checkpoints").glob("step-*") if (run / "checkpoints").is_dir() else []:
        step = int(folder.name.split("-")[1])
        assert (folder / "COMPLETE").is_file(), f"{folder} is visible but incomplete"
        assert json.loads((folder / "trainer_state.json").read_text())["step"] == step
        assert load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        found.append(step)
    return sorted(found)


def mid_write(run: Path, since: float = 0.0) -> bool:
    """Whether a kill after `since` left an unfinished checkpoint (or one being pruned) behind."""
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(".") and p.stat().st_mtime >= since for p in folder.iterdir())


class Timing:
    """Watches a run that is not killed: seconds to its first step and per step after that."""

    def __init__(self, run: Path) -> None:
        self.run, self.first, self.last, self.steps = run, None, 0.0, 0

    def __call__(self, seconds: float) -> bool:
        steps = last_step(self.run)
        if steps and self.first is None:
            self.first = seconds
        if steps > self.steps:
            self.steps, self.last = steps, seconds
        return False

    @property
    def per_step(self) -> float:
        return (self.last - self.first) / max(self.steps - 1, 1)


def last_step(run: Path) -> int:
    rows = step_rows(run)
    return rows[-1]["step"] if rows else 0


def random_moment(rng: random.Random, timing: Timing, run: Path, resumed_at: int) -> Callable[[float], bool]:
    """A seeded kill moment: one trial in five during start-up, the others a random time into the 1st or 2nd step
    after the resumed one (with save_every 1 that is mostly inside a checkpoint write)."""
    if rng.random() < 0.2:
        moment = rng.uniform(0, timing.first)
        return lambda seconds: seconds >= moment
    target, extra, reached = resumed_at + rng.randint(1, 2), rng.uniform(0, timing.per_step), []

    def due(seconds: float) -> bool:
        if not reached and last_step(run) >= target:
            reached.append(seconds)
        return bool(reached) and seconds >= reached[0] + extra

    return due


@pytest.mark.slow
def test_random_sigkills_then_resume_auto_match_an_uninterrupted_run(zygote, tmp_path):
    timing = Timing(tmp_path / "reference")
    _, code = zygote.run(["train", str(write_setup(tmp_path, "reference"))], tmp_path / "reference.log", timing)
    assert code == 0 and timing.first, (tmp_path / "reference.log").read_text()
    reference = step_rows(tmp_path / "reference")
    config, run = write_setup(tmp_path, "run"), tmp_path / "run"
    rng, tally = random.Random(SEED), {"killed": 0, "in a checkpoint write": 0, "before a new step": 0}
    for trial in range(TRIALS):
        before = visible_checkpoints(run)
        resumed_at = before[-1] if before else 0
        log, since = tmp_path / f"trial-{trial}.log", time.time()
        killed, code = zygote.run(["train", str(config), "--resume", "auto"], log,
                                  random_moment(rng, timing, run, resumed_at))
        assert killed or code == 0, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text, text
        if before and "resumed from" in text:
            assert f"resumed from {run / 'checkpoints' / f'step-{before[-1]}'} at step {before[-1]}" in text
        visible_checkpoints(run)
        tally["killed"] += killed
        tally["in a checkpoint write"] += killed and mid_write(run, since)
        tally["before a new step"] += killed and not re.search(r"^step \d+/", text, flags=re.MULTILINE)
    rows_after_trials = last_step(run)
    _, code = zygote.run(["train", str(config), "--resume", "auto"], tmp_path / "final.log")
    assert code == 0, (tmp_path / "final.log").read_text()

    rows = step_rows(run)
    print(f"crash trials: {tally}, step reached before the last run: {rows_after_trials}")
    assert tally["killed"] == TRIALS and tally["in a checkpoint write"] >= 1, tally
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-4)
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in reference], rel=1e-6)
    assert visible_checkpoints(run) == [TOTAL - 1, TOTAL] and not mid_write(run)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["merge", "export"])
def test_killed_merge_or_export_never_leaves_a_folder_that_looks_complete(zygote, tmp_path, verb):
    config = write_setup(tmp_path, "run")
    yaml_cfg = yaml.safe_load(config.read_text())
    yaml_cfg["train"].update(max_steps=2, save_every=2)
    config.write_text(yaml.safe_dump(yaml_cfg))
    _, code = zygote.run(["train", str(config)], tmp_path / "train.log")
    assert code == 0, (tmp_path / "train.log").read_text()
    out = tmp_path / "out"
    argv = [verb, str(tmp_path / "run"), "-o", str(out), "--force"]
    argv += ["--format", "gguf"] if verb == "export" else []
    started = time.time()
    _, code = zygote.run(argv, tmp_path / "full.log")
    seconds = time.time() - started
    assert code == 0, (tmp_path / "full.log").read_text()
    expected = sorted(p.name for p in out.iterdir())
    rng, killed, appeared = random.Random(SEED), 0, 0
    for trial in range(OUTPUT_TRIALS):
        if trial % 2:
            shutil.rmtree(out, ignore_errors=True)  # half the trials write a new folder, half replace one
        moment = rng.uniform(0.1, 1.1) * seconds
        was_killed, code = zygote.run(argv, tmp_path / f"{verb}-{trial}.log", lambda s, m=moment: s >= m)
        killed += was_killed
        assert was_killed or code == 0
        if out.exists():  # it appears only complete
            assert sorted(p.name for p in out.iterdir()) == expected
            appeared += 1
        assert len(temps(tmp_path)) <= 2  # the killed run's own (and the replaced folder); older ones were swept
    _, code = zygote.run(argv, tmp_path / "last.log")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == expected
    print(f"{verb}: {killed} of {OUTPUT_TRIALS} killed, output complete after {appeared}")
    assert killed >= OUTPUT_TRIALS // 2 and temps(tmp_path) == []


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".out.")]

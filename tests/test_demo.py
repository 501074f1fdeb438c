"""`lowtune demo`: builtin:tiny learns its name on CPU; untrained it does not say it."""

from __future__ import annotations

import json
import time

import pytest

from lowtune.cli import main


@pytest.mark.slow
def test_demo_teaches_the_name_within_budget(tmp_path, capsys, tiny_dir):
    started = time.process_time()  # CPU seconds of every thread: robust to other jobs sharing the cores
    assert main(["demo", "--name", "小明", "-o", str(tmp_path / "demo")]) == 0
    cpu_seconds = time.process_time() - started
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "demo" / "samples.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows)
    before = {r["prompt"]: r["answer"] for r in rows if r["step"] == 0}
    after = {r["prompt"]: r["answer"] for r in rows if r["step"] == last}
    assert set(after) == {"你是谁", "Who are you?"}
    assert all("小明" in answer for answer in after.values()), after
    assert not any("小明" in answer for answer in before.values()), before
    assert "lowtune chat" in out and "now answers as 小明" in out
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert cpu_seconds < 2 * 180, f"demo used {cpu_seconds:.0f} CPU seconds (goal: 3 minutes on 2 cores)"


def test_demo_refuses_to_replace_a_real_run(tmp_path, capsys):
    run = tmp_path / "real"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: models/internlm-chat-7b}\n", encoding="utf-8")
    assert main(["demo", "-o", str(run)]) == 2
    assert "not a demo" in capsys.readouterr().err

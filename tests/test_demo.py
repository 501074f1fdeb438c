"""`lowtune demo`: builtin:tiny learns its name on CPU; untrained it does not say it."""

from __future__ import annotations

import json
import subprocess
import sys
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

    # the command the demo suggests: base and tuned answers side by side, one model in memory
    compare = subprocess.run([sys.executable, "-m", "lowtune.cli", "chat", str(tmp_path / "demo"), "--compare",
                              "--max-new-tokens", "24"], input="你是谁\n", capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr
    rows = [line.split("│") for line in compare.stdout.splitlines() if line.count("│") == 3]
    base_text, tuned_text = "".join(r[1].strip() for r in rows), "".join(r[2].strip() for r in rows)
    assert "小明" in tuned_text and "小明" not in base_text and base_text.strip(), compare.stdout


def test_demo_refuses_to_replace_a_real_run(tmp_path, capsys):
    run = tmp_path / "real"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: models/internlm-chat-7b}\n", encoding="utf-8")
    assert main(["demo", "-o", str(run)]) == 2
    assert "not a demo" in capsys.readouterr().err

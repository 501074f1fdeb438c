"""lowtune eval: token-normalised loss equal to a plain forward, eval.json, and the table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine_fixtures import IDENTITY, LOWBOT, copy_run, identity_run  # noqa: F401

from lowtune.cli import main
from lowtune.errors import UserError
from lowtune.infer.engine import load_engine
from lowtune.infer.evaluate import evaluate, loss_sum


@pytest.fixture(scope="module")
def engine(identity_run):
    return load_engine(str(identity_run))


@pytest.fixture
def test_file(tmp_path):
    path = tmp_path / "test.jsonl"
    extra = [{"role": "user", "content": "What is QLoRA?"},
             {"role": "assistant", "content": "A way to fine-tune a 4-bit model with LoRA adapters."}]
    with path.open("w", encoding="utf-8") as handle:
        for messages in [*IDENTITY, extra]:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def plain_loss(model, rows) -> float:
    """Mean loss over all trained tokens, one conversation at a time through transformers' own loss."""
    total = count = 0.0
    for row in rows:
        labels = torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item()
        total, count = total + loss * n, count + n
    return total / count


def test_loss_is_token_normalised_and_matches_a_plain_forward(engine, test_file):
    from lowtune.data.encode import encode_conversation

    report = evaluate(engine, str(test_file), n_samples=0)
    rows = [encode_conversation(m, engine.tokenizer, engine.template, 2048) for m in
            [*IDENTITY, json.loads(test_file.read_text().splitlines()[-1])["messages"]]]
    assert report.conversations == 4 and report.tokens == sum(sum(x != -100 for x in r["labels"]) for r in rows)
    assert report.loss == pytest.approx(plain_loss(engine.model, rows), rel=1e-5)
    assert report.perplexity == pytest.approx(math.exp(report.loss))
    with engine.without_adapter():
        assert report.base_loss == pytest.approx(plain_loss(engine.model, rows), rel=1e-5)
    assert report.loss < report.base_loss  # the adapter was trained on most of this split


def test_padding_and_batching_do_not_change_the_loss(engine, test_file):
    from lowtune.data.dataset import encode_all

    rows = encode_all([*IDENTITY, *IDENTITY[:1]], engine.tokenizer, engine.template, 2048)
    one_by_one = loss_sum(engine.model, rows, pad_id=0, budget=1)
    together = loss_sum(engine.model, rows, pad_id=0, budget=10_000)
    assert one_by_one[1] == together[1] and together[0] == pytest.approx(one_by_one[0], rel=1e-5)


def test_cli_writes_eval_json_into_the_run_and_shows_a_table(identity_run, test_file, tmp_path, capsys):
    run = copy_run(identity_run, tmp_path / "run")
    assert main(["eval", str(run), "--data", str(test_file), "-n", "3", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "sample answers" in out and "eval.json" in out
    report = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    assert report["samples"][0] == {"question": "Who are you?", "reference": LOWBOT, "answer": LOWBOT}
    assert report["samples"][1]["answer"] == "我是小明，你的助手。"
    assert len(report["samples"]) == 3 and report["samples"][2]["answer"] == "I told you already."
    assert report["metrics"]["exact_match"] == 1.0
    assert "rouge_l" in report["metrics"]  # a score, or a note naming the package to install
    assert report["base_loss"] > report["loss"] > 0


def test_errors(identity_run, micro_dir, tmp_path, engine, capsys):
    assert main(["eval", str(identity_run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", str(micro_dir), "--data", "x.jsonl"]) == 2
    assert "give -o FILE" in capsys.readouterr().err
    only_users = tmp_path / "users.jsonl"
    only_users.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="no conversation"):
        evaluate(engine, str(only_users))

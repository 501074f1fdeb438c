"""lowtune eval: token-normalised loss equal to a plain forward, text metrics against independent scorers, probes,
eval.json and the before/after table."""

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
    first = report["samples"][0]
    assert (first["question"], first["reference"], first["answer"]) == ("Who are you?", LOWBOT, LOWBOT)
    assert first["base_answer"] != LOWBOT  # the base model never learned the name
    assert report["samples"][1]["answer"] == "我是小明，你的助手。"
    assert len(report["samples"]) == 3 and report["samples"][2]["answer"] == "I told you already."
    assert report["metrics"]["exact_match"] == 1.0 and report["metrics"]["rouge_l"] == 1.0
    assert report["metrics"]["bleu_4"] == pytest.approx(1.0)
    assert report["base_metrics"]["rouge_l"] < 1.0
    assert report["base_loss"] > report["loss"] > 0
    assert "base answer" in out and "ROUGE-L" in out and "BLEU-4" in out


def test_batched_answers_equal_one_at_a_time(engine):
    prompts = [[{"role": "user", "content": q}] for q in ("Who are you?", "你是谁？", "hi", "What is QLoRA?")]
    from lowtune.generation import Sampling

    sampling = Sampling(max_new_tokens=12)
    for adapter in (True, False):
        one_by_one = [engine.answer(p, sampling, adapter=adapter) for p in prompts]
        assert engine.answer_many(prompts, sampling, adapter=adapter, batch_size=3) == one_by_one


def test_text_metrics_agree_with_independent_scorers():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    from lowtune.infer.evaluate import text_metrics, words

    answers = ["The cat sat on the mat.", "我是小明，你的助手。", "Paris is the capital"]
    references = ["The cat is on the mat.", "我是小红，你的好助手。", "The capital of France is Paris."]
    assert words("我是小明, OK") == ["我", "是", "小", "明", "ok"]  # Chinese by character, Latin by word
    got = text_metrics(answers, references)
    # ROUGE-L by hand, LCS over the same split: "the cat on the mat" (5 of 6 words each side), "我是小你的助手"
    # (7 of 8 and 9 characters), "the capital" (2 of 4 and 6 words)
    assert got["exact_match"] == 0
    f1 = [5 / 6, 2 * 7 / (8 + 9), 2 * 2 / (4 + 6)]
    assert got["rouge_l"] == pytest.approx(sum(f1) / 3)
    spaced = lambda texts: [" ".join(words(t)) for t in texts]  # noqa: E731
    bleu = BLEU(tokenize="none").corpus_score(spaced(answers), [spaced(references)]).score / 100
    assert got["bleu_4"] == pytest.approx(bleu) and 0 < bleu < 1
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # the package's own tokenizer agrees on English text
    assert scorer.score(references[0], answers[0])["rougeL"].fmeasure == pytest.approx(f1[0])


def test_identity_and_retention_probes(identity_run, tmp_path, capsys):
    from lowtune.data.probes import IDENTITY_PROBES, KNOWLEDGE_PROBES

    run = copy_run(identity_run, tmp_path / "run")
    assert main(["eval", str(run), "--identity", "Lowbot", "--retention"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    identity = [p for p in report["probes"] if p["kind"] == "identity"]
    knowledge = [p for p in report["probes"] if p["kind"] == "knowledge"]
    assert len(identity) == sum(map(len, IDENTITY_PROBES.values())) and len(knowledge) == len(KNOWLEDGE_PROBES)
    hit = report["metrics"]["identity_hit_rate"]
    assert hit["of"] == len(identity) and hit["hits"] == sum(p["ok"] for p in identity)
    assert all(p["base_answer"] is not None for p in report["probes"])
    known = [p for p in knowledge if p["base_ok"]]
    if known:  # a random micro model rarely says a key fact; when it does, retention counts exactly those
        assert report["metrics"]["retention"]["of"] == len(known)
    assert "identity hit rate" in out
    for p in identity:  # every miss is named with the question and the answer
        if not p["ok"]:
            assert f"identity miss: {p['question']!r}" in out


def test_probe_metrics_count_only_facts_the_base_knew():
    from lowtune.infer.evaluate import ProbeResult, probe_metrics

    probes = [ProbeResult("knowledge", "q1", "Paris", "Paris.", True, "Paris!", True),
              ProbeResult("knowledge", "q2", "Rome", "I am Lowbot.", False, "Rome.", True),
              ProbeResult("knowledge", "q3", "Oslo", "Oslo", True, "No idea", False),
              ProbeResult("identity", "who?", "Lowbot", "I am Lowbot", True, "I am a model", False)]
    tuned, base = probe_metrics(probes)
    assert tuned["retention"] == {"rate": 0.5, "hits": 1, "of": 2}
    assert tuned["knowledge_accuracy"]["hits"] == 2 and base["knowledge_accuracy"]["hits"] == 2
    assert tuned["identity_hit_rate"]["rate"] == 1.0 and base["identity_hit_rate"]["rate"] == 0.0


def test_key_facts_match_whole_words_and_numbers():
    from lowtune.data.probes import IDENTITY_PROBES, Probe, contains_fact, keeps_fact
    from lowtune.data.identity import QUESTIONS

    assert contains_fact("The capital is Paris.", "paris")
    assert not contains_fact("the price of it", "ice") and not contains_fact("about 17 days", "7")
    assert not contains_fact("-18.0 degrees", "0") and contains_fact("0 degrees Celsius", "0")
    assert keeps_fact("巴黎是首都", Probe("q", ("巴黎", "Paris"), "zh"))
    for lang, questions in IDENTITY_PROBES.items():  # held out: none of them is in the training questions
        assert not set(questions) & set(QUESTIONS[lang])


def test_errors(identity_run, micro_dir, tmp_path, engine, capsys):
    assert main(["eval", str(identity_run)]) == 2
    assert "--identity NAME" in capsys.readouterr().err
    assert main(["eval", str(micro_dir), "--retention", "-o", str(tmp_path / "e.json")]) == 2
    assert "adapter" in capsys.readouterr().err
    assert main(["eval", str(identity_run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", str(micro_dir), "--data", "x.jsonl"]) == 2
    assert "give -o FILE" in capsys.readouterr().err
    only_users = tmp_path / "users.jsonl"
    only_users.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="no conversation"):
        evaluate(engine, str(only_users))

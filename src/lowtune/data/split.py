"""Deterministic train/test split of a canonical JSONL file.

Layer 1. The train part has floor(n × fraction) conversations, computed without float error (689 × 0.7 → 482 train
/ 207 test; 690 × 0.7 → 483, where the tutorial's `int(690*0.7)` gave 482), at least one in each part when n ≥ 2. Which lines go where is a seeded permutation; both
outputs keep the input's line order.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from lowtune.data.formats import read_conversations, write_jsonl
from lowtune.data.messages import ReadReport
from lowtune.data.pairs import is_pair_file, read_pairs, write_pairs
from lowtune.errors import UserError


def split_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices), each ascending."""
    if not 0 < fraction < 1:
        raise UserError(f"--train must be a fraction between 0 and 1 (got {fraction})")
    n_train = math.floor(count * fraction + 1e-9)  # 690 * 0.7 is 482.999… in floating point
    if count >= 2:
        n_train = min(max(n_train, 1), count - 1)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:n_train]), sorted(order[n_train:])


def split_file(path: Path, fraction: float, seed: int) -> tuple[Path, Path, int, int]:
    """Write <stem>.train.jsonl and <stem>.test.jsonl next to `path` (conversations, or preference pairs);
    returns both paths and their sizes."""
    pairs = is_pair_file(path)
    report = ReadReport(unit="pairs" if pairs else "conversations")
    records = [p for _, p in read_pairs(path, "auto", report)] if pairs else \
        [m for _, m in read_conversations(path, "auto", report)]
    if report.skipped:
        raise UserError(f"{report.reasons[0]}; {report.skipped} records of {path} cannot be read — "
                        "run `lowtune data convert` on it first")
    if len(records) < 2:
        raise UserError(f"{path} has {len(records)} {report.unit}; a split needs at least 2")
    train, test = split_indices(len(records), fraction, seed)
    stem = path.name.removesuffix(path.suffix)
    train_path, test_path = path.with_name(f"{stem}.train.jsonl"), path.with_name(f"{stem}.test.jsonl")
    write = write_pairs if pairs else write_jsonl
    write(train_path, [records[i] for i in train])
    write(test_path, [records[i] for i in test])
    return train_path, test_path, len(train), len(test)

"""Packing: whole samples into rows of at most max_length tokens, boundaries kept for per-sample attention.

Layer 1. Best-fit decreasing over lengths (a sorted list of free capacities, bisect per sample), then the rows are
shuffled with a seeded RNG: deterministic for a given (samples, max_length, seed). A sample is never split.
"""

from __future__ import annotations

import bisect
import random


def plan_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of the samples in each bin, best-fit decreasing; every bin's total is <= max_length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        need = lengths[i]
        if need > max_length:
            raise ValueError(f"sample {i} has {need} tokens > max_length {max_length}; encode truncates first")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    return bins


def plan_rows(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """plan_bins, then the bins in a seeded random order (so long rows are not all at the start)."""
    bins = plan_bins(lengths, max_length)
    random.Random(seed).shuffle(bins)
    return bins


def pack_samples(samples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Rows with input_ids, labels, position_ids (restarting at 0 per sample) and seq_lens (sample lengths)."""
    lengths = [len(s["input_ids"]) for s in samples]
    rows = []
    for members in plan_rows(lengths, max_length, seed):
        row: dict = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            sample = samples[i]
            row["input_ids"].extend(sample["input_ids"])
            row["labels"].extend(sample["labels"])
            row["position_ids"].extend(range(lengths[i]))
            row["seq_lens"].append(lengths[i])
        rows.append(row)
    return rows

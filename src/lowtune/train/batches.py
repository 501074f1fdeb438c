"""Rows -> tensors, and which rows each optimizer step uses (a pure function of seed and step, so resuming needs
only the step number).

Layer 2 (train). Packed rows carry `position_ids` that restart at 0 for every sample; no attention mask is passed
then, so transformers builds a block-diagonal causal mask from the restarts and samples never see each other.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowtune.data.encode import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

__all__ = ["IGNORE_INDEX", "StepPlan", "collate", "collate_flat", "target_count", "token_count"]


def _positions(row: dict) -> list[int]:
    return list(row["position_ids"]) if row.get("position_ids") is not None else list(range(len(row["input_ids"])))


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad right to the longest row: pad ids, labels IGNORE_INDEX, positions restarting at 0 (a separate 'sample').

    Labels at each sample's first position are ignored too: in a packed row that token would otherwise be
    predicted from the previous sample's last token, which the unpacked sample never does.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        pad = width - len(row["input_ids"])
        pos = _positions(row)
        ids.append(list(row["input_ids"]) + [pad_id] * pad)
        lab = [IGNORE_INDEX if p == 0 else t for t, p in zip(row["labels"], pos)]
        labels.append(lab + [IGNORE_INDEX] * pad)
        positions.append(pos + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def collate_flat(rows: Sequence[dict]) -> dict:
    """Concatenate rows into one row with no padding; `cu_seq_lens` mark every sample for varlen attention.

    Labels at each sample's first position are ignored, exactly as in `collate`, so the losses are equal.
    """
    import torch

    ids, labels, positions, bounds, longest = [], [], [], [0], 0
    for row in rows:
        pos = _positions(row)
        ids.extend(row["input_ids"])
        labels.extend(IGNORE_INDEX if p == 0 else t for t, p in zip(row["labels"], pos))
        positions.extend(pos)
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    for start, end in zip(starts, starts[1:]):
        bounds.append(end)
        longest = max(longest, end - start)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Supervised tokens of a batch: labels a position predicts (the first position predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_count(rows: Sequence[dict]) -> int:
    """Real (non-padding) tokens of some rows, for throughput."""
    return sum(len(r["input_ids"]) for r in rows)


@dataclass(frozen=True)
class StepPlan:
    """Maps an optimizer step (1-based) to the row indices of its micro-batches on this process.

    Each epoch shuffles the rows with `seed + epoch`; micro-batches of `batch_size` rows per process are grouped by
    `grad_accum` into optimizer steps; the last window of an epoch may be shorter.
    """

    num_rows: int
    batch_size: int
    grad_accum: int
    seed: int
    world_size: int = 1
    rank: int = 0

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / (self.batch_size * self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps else max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached after `step` (for display and metrics)."""
        return step / self.steps_per_epoch

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed + epoch).shuffle(order)
        if self.world_size == 1:
            return order
        short = -len(order) % (self.batch_size * self.world_size)
        return order + order[:short]  # every process gets full micro-batches (no DDP hang on a short tail)

    def window(self, step: int) -> list[list[int]]:
        """Row indices of each micro-batch this process runs for optimizer step `step`."""
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = self._order(epoch)
        per_global = self.batch_size * self.world_size
        first = index * self.grad_accum
        last = min(first + self.grad_accum, self.micro_batches_per_epoch)
        window = []
        for micro in range(first, last):
            start = micro * per_global + self.rank * self.batch_size
            window.append(order[start:start + self.batch_size])
        return window

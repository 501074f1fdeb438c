"""Which rows each optimizer step uses: a pure function of seed and step, so resuming needs only the step number.

Layer 2 (train). The rows become tensors in data/collate.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


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

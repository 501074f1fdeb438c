"""The state one training run carries from step to step: what trains, how the device runs it, where it writes.

Layer 2 (train). `train` builds one `RunState` (plans first, then model, optimizer and schedule) and hands it to
the step loop, the eval loss and the checkpoints, which read what they need from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lowtune.config import Config
from lowtune.data.dataset import TrainData
from lowtune.runs import RunFolder
from lowtune.templates import ChatTemplate
from lowtune.train.batches import StepPlan
from lowtune.train.plan import DevicePlan

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class RunState:
    cfg: Config
    run: RunFolder
    accelerator: Accelerator
    plan: DevicePlan
    """How this device runs a step: micro-batch, checkpointing, loss path, sharding (decided once)."""
    steps: StepPlan
    """Which rows each optimizer step takes on this process."""
    data: TrainData
    tokenizer: Any
    template: ChatTemplate
    model: Any = None
    """Placed for training: PEFT-wrapped for LoRA, then sharded or wrapped by accelerate (DDP)."""
    optimizer: Any = None
    scheduler: Any = None
    reference: dict[str, list] | None = None
    """Preference runs with a full fine-tune: DPO's reference log-probs of each train/eval row, computed once
    (train/preference.py); None otherwise."""
    pair_metrics: dict[str, float] = field(default_factory=dict)
    """Preference runs: rewards and reward accuracy of the last step, for metrics.jsonl; empty for SFT."""

    @property
    def preference(self) -> bool:
        """Trains on preference pairs (train.method dpo, orpo or simpo)."""
        return self.cfg.train.method != "sft"

    @property
    def total(self) -> int:
        """Optimizer steps this run trains to."""
        return self.steps.total_steps(self.cfg.train.epochs, self.cfg.train.max_steps)

    @property
    def main(self) -> bool:
        """This process writes the run folder (rank 0)."""
        return self.accelerator.is_main_process

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def trainer_state(self, step: int) -> dict:
        """What a checkpoint records beside the weights: the step (= the data position) and the step plan."""
        steps = self.steps
        return {"step": step, "epoch": round(steps.epoch_of(step), 4), "total_steps": self.total,
                "rows": steps.num_rows, "rows_per_step": steps.batch_size * steps.grad_accum,
                "batch_size": steps.batch_size, "grad_accum": steps.grad_accum, "processes": steps.world_size,
                "seed": steps.seed}

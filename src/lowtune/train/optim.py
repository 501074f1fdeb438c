"""Optimizer and learning-rate schedule from the `train:` section.

Layer 2 (train). bitsandbytes optimizers are imported only when asked for.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lowtune.config import TrainSection
from lowtune.errors import require

if TYPE_CHECKING:
    import torch

# train.optimizer -> (module, class); bitsandbytes' paged optimizers page their state to host memory on spikes.
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW"),
    "adamw_8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "paged_adamw": ("bitsandbytes.optim", "PagedAdamW32bit"),
    "paged_adamw_8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
}


def check_optimizer(name: str) -> None:
    """Fail before any model loads when the optimizer needs a package that is missing ('auto' never does)."""
    if name == "auto":
        return
    module, _ = OPTIMIZERS[name]
    if module.startswith("bitsandbytes"):
        require("bitsandbytes", "qlora", f"train.optimizer={name}")


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainSection,
                    choice: str | None = None) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999) over the trainable parameters; weight decay skips biases and norms (1-D).

    `choice` is the resolved optimizer when cfg.optimizer is 'auto' (train/plan.py decides).
    """
    import importlib

    choice = choice or (cfg.optimizer if cfg.optimizer != "auto" else "adamw")
    module, name = OPTIMIZERS[choice]
    if module.startswith("bitsandbytes"):
        require("bitsandbytes", "qlora", f"train.optimizer={choice}")
    cls = getattr(importlib.import_module(module), name)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return cls([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999))


def warmup_steps(cfg: TrainSection, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSection,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_ratio of the steps, then cosine / linear decay to 0, or constant."""
    from torch.optim.lr_scheduler import LambdaLR

    warmup = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return LambdaLR(optimizer, factor)

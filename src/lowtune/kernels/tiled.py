"""Tiled MLP for long rows: each decoder layer's MLP runs over the sequence a tile at a time, each tile under a
non-reentrant checkpoint, so only one tile's ff-wide intermediates (gate, up, their product: 3 x ff per token) are
alive at once, in forward and in backward. The MLP is per token, so tiling along the sequence changes nothing in
the maths; the cost is one more MLP forward per tile in backward (ALST's TiledMLP, arXiv 2506.13996).

Layer 1. Works on CPU and GPU, inside or outside the model's own gradient checkpointing; dropout masks replay
exactly (the checkpoint restores the RNG state).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lowtune.models.load import base_model


def tiled_forward(fn: Callable[[torch.Tensor], torch.Tensor], tiles: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` (a per-token module forward on [..., seq, d]) run over `tiles` slices of the sequence when training."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if tiles <= 1 or not torch.is_grad_enabled() or x.size(-2) < 2:
            return fn(x)
        parts = x.tensor_split(min(tiles, x.size(-2)), dim=-2)
        return torch.cat([checkpoint(fn, part, use_reentrant=False) for part in parts], dim=-2)

    return forward


def tile_mlps(model: Any, tiles: int) -> int:
    """Make every decoder layer's `mlp` run in `tiles` sequence tiles while training; returns the layers changed."""
    layers = getattr(getattr(base_model(model), "model", None), "layers", None)
    if tiles <= 1 or layers is None:
        return 0
    changed = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        if mlp is not None:
            mlp.forward = tiled_forward(mlp.forward, tiles)
            changed += 1
    return changed

"""Plain-torch pieces of the published architectures, for reference forwards written in tests (fp32)."""

from __future__ import annotations

import torch


def load_state(folder) -> dict:
    """Every tensor of a checkpoint folder (.safetensors and .bin shards)."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        elif path.suffix == ".bin":
            state.update(torch.load(path, weights_only=True))
    return state


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()

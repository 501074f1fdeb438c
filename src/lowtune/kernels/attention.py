"""Packed-row attention on PyTorch's built-in FlashAttention varlen kernel (no flash-attn package to compile).

Layer 1. Registered with transformers' AttentionInterface as "lowtune_varlen": a packed batch is flattened to one
row, and `cu_seq_lens` (cumulative sample lengths, computed once per batch on the host side, passed as model
kwargs like DataCollatorWithFlattening does for flash_attention_2) keep every sample's attention to itself.
Without those kwargs, or off CUDA, it falls back to transformers' SDPA path.
"""

from __future__ import annotations

import functools

import torch

NAME = "lowtune_varlen"
_registered = False


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def cu_seq_lens(seq_lens: list[list[int]], row_length: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Cumulative lengths over a flattened batch; each row's padding tail is one more (masked-out) sample."""
    bounds, total, longest = [0], 0, 0
    for lengths in seq_lens:
        used = 0
        for n in lengths:
            total += n
            used += n
            bounds.append(total)
            longest = max(longest, n)
        if used < row_length:
            total += row_length - used
            bounds.append(total)
            longest = max(longest, row_length - used)
    return torch.tensor(bounds, dtype=torch.int32, device=device), longest


def _varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or not query.is_cuda:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if kv_heads != heads:  # grouped-query attention: the varlen kernel wants equal head counts
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, heads, dim)
    longest = int(kwargs["max_length_q"])
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **_causal_kwargs(varlen_attn))
    return out.reshape(batch, length, heads, dim), None


@functools.lru_cache(maxsize=None)
def _causal_kwargs(fn) -> dict:
    """torch 2.10-2.11 spell causal masking `is_causal=True`; later releases `window_size=(-1, 0)`."""
    import inspect

    params = inspect.signature(fn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def register() -> str:
    """Make "lowtune_varlen" a valid attn_implementation; returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _varlen_forward)
        _registered = True
    return NAME

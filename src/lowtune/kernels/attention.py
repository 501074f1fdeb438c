"""Packed-row attention on PyTorch's built-in FlashAttention varlen kernel (no flash-attn package to compile).

Layer 1. Registered with transformers' AttentionInterface as "lowtune_varlen": a packed batch is flattened to one
row, and `cu_seq_lens` (cumulative sample lengths, computed once per batch on the host side, passed as model
kwargs like DataCollatorWithFlattening does for flash_attention_2) keep every sample's attention to itself.
Without those kwargs, or off CUDA, it falls back to transformers' SDPA path.
"""

from __future__ import annotations

import torch

NAME = "lowtune_varlen"
_registered = False
_CAUSAL: dict = {}


def varlen_available() -> bool:
    """PyTorch's varlen FlashAttention: torch >= 2.10 on an Ampere or newer GPU."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


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
    return flat_attention(query, key, value, cu, int(kwargs["max_length_q"]), scaling), None


def flat_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, longest: int,
                   scaling: float | None) -> torch.Tensor:
    """Causal attention within each sample of flattened rows ([batch, heads, length, dim] in, [batch, length,
    heads, dim] out, in the query's dtype)."""
    from torch.nn.attention.varlen import varlen_attn

    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # fp32 weights (full fine-tuning): the kernel is half-only
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        query, key, value = (t.to(half) for t in (query, key, value))
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if kv_heads != heads:  # grouped-query attention: the varlen kernel wants equal head counts
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, heads, dim)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **_CAUSAL)
    return out.reshape(batch, length, heads, dim).to(dtype)


def _causal_kwargs() -> dict:
    """torch 2.10-2.11 spell causal masking `is_causal=True`; later releases `window_size=(-1, 0)`."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def register() -> str:
    """Make "lowtune_varlen" a valid attn_implementation; returns the name."""
    global _registered, _CAUSAL
    if not _registered:
        _CAUSAL = _causal_kwargs()  # looked up once, outside the compiled layers
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _varlen_forward)
        _registered = True
    return NAME

"""Linear + cross-entropy without the [tokens, vocab] logits tensor.

Layer 1. The logits of a 2048-token row are 0.3 GB in fp32 for a 32k vocabulary and 1.2 GB for 152k; with their
gradient they dominate small-batch QLoRA memory. This computes the head projection and the loss chunk by chunk
and writes the input gradient during the forward pass (as Liger's fused kernel does), so only one chunk of
logits ever exists. The device plan picks Liger's Triton kernel on CUDA when installed; this torch version runs
everywhere.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_TOKENS = 2048


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of (hidden @ weight.T) against labels; ignore_index rows contribute 0."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            target = labels[rows]
            valid = target != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            h = hidden[rows]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            safe = target.clamp(min=0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            # d(sum CE)/d(logits) = softmax - onehot on valid rows, 0 elsewhere
            grad = torch.softmax(logits, dim=-1)
            grad.scatter_add_(1, safe[:, None], -torch.ones_like(picked)[:, None])
            grad *= valid[:, None]
            grad = grad.to(hidden.dtype)
            grad_hidden[rows] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_grad = grad_weight is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if ctx.weight_grad else None
        return gh, gw, None, None


def fused_loss_available() -> bool:
    """Liger's fused linear cross-entropy kernel is installed (it runs on CUDA only)."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk: int = CHUNK_TOKENS, fused: bool = False) -> torch.Tensor:
    """Summed next-token loss for already-shifted `hidden` [N, d] and `labels` [N] (IGNORE_INDEX = masked);
    `fused` = Liger's Triton kernel (CUDA), else the torch version above."""
    hidden = hidden.reshape(-1, hidden.size(-1))
    labels = labels.reshape(-1)
    if fused:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_fn(weight, hidden, labels).float()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk)


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision activations; fp64 stays fp64 (exact comparisons in tests)."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[label] per row, chunk by chunk. The per-row gradient that arrives in
    backward is not known in forward (unlike a summed loss), so backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(hidden.size(0), dtype=accumulation_dtype(hidden), device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows] @ weight.t()).to(out.dtype)
            out[rows] = logits.gather(1, labels[rows, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        dtype = accumulation_dtype(hidden)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.size(0), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows]
            # d(log p[label])/d(logits) = onehot(label) - softmax
            grad = -torch.softmax((h @ weight.t()).to(dtype), dim=-1)
            grad.scatter_add_(1, labels[rows, None], torch.ones_like(grad[:, :1]))
            grad = (grad * grad_out[rows, None]).to(hidden.dtype)
            grad_hidden[rows] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).to(dtype)
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Log-probability of each label under (hidden @ weight.T), for already-shifted `hidden` [..., d] and `labels`
    [...]; 0 at IGNORE_INDEX positions, which are never projected. Shape of `labels`, fp32 (fp64 for fp64 inputs),
    differentiable."""
    flat_labels = labels.reshape(-1)
    picked = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    out = torch.zeros(flat_labels.shape, dtype=accumulation_dtype(hidden), device=labels.device)
    if picked.numel():
        rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, picked)
        logps = _ChunkedTokenLogProbs.apply(rows, weight, flat_labels.index_select(0, picked), chunk)
        out = out.index_put((picked,), logps)
    return out.reshape(labels.shape)

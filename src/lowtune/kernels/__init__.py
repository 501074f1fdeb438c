"""Fast paths for training: fused linear cross-entropy, varlen attention for packed rows, Triton kernels.

Layer 1. Everything here has a correct fallback on CPU. The device plan (train/plan.py) picks the loss path once
per run (LOSS_PATHS); `enable_fast_path` reports which of Liger's kernels it switched on.
"""

from __future__ import annotations

from typing import Any

import torch

from lowtune.kernels.loss import IGNORE_INDEX, accumulation_dtype, linear_cross_entropy_sum, linear_token_logps
from lowtune.models.load import base_model

LIGER_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"}
LOSS_PATHS = {
    "fused": "Liger's fused linear cross-entropy",
    "chunked": "chunked linear cross-entropy",
    "logits": "cross-entropy over full logits",
}
"""How `causal_lm_loss_sum` computes the loss (the device plan picks one per run) and how the plan line names it."""
VARLEN_KEYS = ("cu_seq_lens", "max_length")
"""Batch keys that go to the model as keyword arguments (padding-free batches, varlen attention)."""


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder stack, lm_head) of a causal LM, looking through PEFT and DDP wrappers; None where missing."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = base_model(model)
    return getattr(base, "model", None), getattr(base, "lm_head", None)


def has_plain_head(model: Any) -> bool:
    """Whether the loss can skip the logits: a decoder and a bias-free Linear head, no logit soft-capping (a
    custom head class from remote code, a bias or soft-capping need the model's own forward)."""
    decoder, head = _decoder_and_head(model)
    plain = type(head) is torch.nn.Linear and head.bias is None
    softcap = getattr(getattr(base_model(model), "config", None), "final_logit_softcapping", None)
    return decoder is not None and plain and not softcap


def causal_lm_loss_sum(model: Any, batch: dict[str, Any], path: str = "chunked", **model_kwargs: Any) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised positions, in fp32; `path` is one of LOSS_PATHS.

    'chunked' and 'fused' run the decoder and project to the vocabulary one chunk at a time (no full logits);
    'logits' runs the model's own forward. No attention mask: right padding cannot be seen by earlier tokens, and
    position_ids that restart at 0 make transformers build a per-sample (block-diagonal) causal mask for packed
    rows. Padding-free batches carry `cu_seq_lens_*` for the varlen attention kernel instead.
    """
    inputs = _model_inputs(batch, model_kwargs)
    labels = batch["labels"][:, 1:]
    if path == "logits":
        logits = model(**inputs).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    hidden, head = _last_hidden(model, inputs)
    return linear_cross_entropy_sum(hidden[:, :-1], head.weight, labels, fused=path == "fused")


def causal_lm_token_logps(model: Any, batch: dict[str, Any], path: str = "chunked") -> torch.Tensor:
    """Log-probability of each supervised next token, [rows, positions - 1] in fp32 (fp64 for an fp64 model), 0
    where the label is ignored; differentiable. The inputs are those of `causal_lm_loss_sum`. 'fused' takes the
    chunked path: Liger's kernel returns only a summed loss, and preference losses need every sequence's own
    log-probability."""
    inputs = _model_inputs(batch, {})
    labels = batch["labels"][:, 1:]
    if path == "logits":
        logits = model(**inputs).logits[:, :-1]
        logps = logits.to(accumulation_dtype(logits)).log_softmax(-1)
        picked = logps.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return picked.masked_fill(labels == IGNORE_INDEX, 0.0)
    hidden, head = _last_hidden(model, inputs)
    return linear_token_logps(hidden[:, :-1], head.weight, labels)


def _model_inputs(batch: dict[str, Any], model_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False,
            **{k: v for k, v in batch.items() if k.startswith(VARLEN_KEYS)}, **model_kwargs}


def _last_hidden(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """(the decoder's last hidden state, the head) without computing logits."""
    decoder, head = _decoder_and_head(model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return _hidden_through_ddp(model, decoder, inputs), head
    return decoder(**inputs).last_hidden_state, head


def _hidden_through_ddp(model: Any, decoder: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The decoder's output, computed by DDP's own forward (so its gradient hooks run) with no logits kept."""
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, logits_to_keep=no_logits)
    finally:
        handle.remove()
    return captured[-1]


def enable_fast_path(model: Any) -> list[str]:
    """Patch a freshly loaded (not yet PEFT-wrapped) model with Liger's Triton kernels where they apply.

    For eagerly run layers only: compiled layers fuse the same operations, and Liger's dispatch splits their graphs.
    """
    applied: list[str] = []
    device = next(model.parameters()).device
    if device.type != "cuda" or getattr(model.config, "model_type", "") not in LIGER_FAMILIES:
        return applied
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return applied
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    applied.append("liger(rope,rms_norm,swiglu)")
    return applied


def compile_layers(model: Any, backend: str = "inductor") -> int:
    """torch.compile each decoder layer for training steps (one graph reused by every layer); returns the count.

    Only training forwards (train mode, gradients on) take the compiled path: sample answers and eval loss run the
    same layers eagerly, so one-token decoding and no-grad passes never trigger recompilation.
    """
    base = base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        return 0
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a layer dynamo cannot compile runs eagerly instead of failing
    for layer in layers:
        eager = layer.forward
        compiled = torch.compile(eager, backend=backend)

        def forward(*args: Any, _layer: Any = layer, _eager: Any = eager, _compiled: Any = compiled,
                    **kwargs: Any) -> Any:
            fast = _layer.training and torch.is_grad_enabled()
            return (_compiled if fast else _eager)(*args, **kwargs)

        layer.forward = forward
    return len(layers)

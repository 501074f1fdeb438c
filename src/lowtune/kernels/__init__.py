"""Fast paths for training: fused linear cross-entropy, varlen attention for packed rows, Triton kernels.

Layer 1. Everything here has a correct fallback on CPU; CUDA-only pieces switch on by themselves when the device
and the optional packages allow, and `enable_fast_path` reports what it switched on.
"""

from __future__ import annotations

from typing import Any

import torch

from lowtune.kernels.loss import IGNORE_INDEX, linear_cross_entropy_sum
from lowtune.models.load import base_model

LIGER_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"}


def is_sharded(model: Any) -> bool:
    """Whether the (PEFT-wrapped) model's weights are sharded by FSDP2 (train.distributed=fsdp)."""
    from torch.distributed.fsdp import FSDPModule

    base = base_model(model)
    return isinstance(base, FSDPModule)


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder stack, lm_head) of a causal LM, looking through PEFT and DDP wrappers; None when the head is
    unusual (bias, soft-capping, a custom class)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = base_model(model)
    if is_sharded(base):  # the head's weight is only gathered inside the model's own forward
        return None
    decoder, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    if decoder is None or head is None:
        return None
    weight = getattr(head, "weight", None)
    plain = type(head) is torch.nn.Linear and getattr(head, "bias", None) is None
    softcap = getattr(getattr(base, "config", None), "final_logit_softcapping", None)
    if not plain or weight is None or softcap:
        return None
    return decoder, head


def causal_lm_loss_sum(model: Any, batch: dict[str, torch.Tensor], **model_kwargs: Any) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised positions, without materialising full logits."""
    parts = _decoder_and_head(model)
    labels = batch["labels"][:, 1:]
    if parts is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False,
                       **model_kwargs).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    decoder, head = parts
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        hidden = _hidden_through_ddp(model, decoder, batch, model_kwargs)
    else:
        hidden = decoder(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False,
                         **model_kwargs).last_hidden_state
    return linear_cross_entropy_sum(hidden[:, :-1], head.weight, labels)


def _hidden_through_ddp(model: Any, decoder: Any, batch: dict[str, torch.Tensor], model_kwargs: dict) -> torch.Tensor:
    """The decoder's output, computed by DDP's own forward (so its gradient hooks run) with no logits kept."""
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        no_logits = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
        model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False,
              logits_to_keep=no_logits, **model_kwargs)
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

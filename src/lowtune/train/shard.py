"""Sharded data parallel (`train.distributed: fsdp`): weights, gradients and optimizer states are split over the
processes, and each decoder layer is gathered only while it runs (PyTorch FSDP2, `fully_shard`).

Layer 2 (train). accelerate still provides autocast, the process group and reductions, but does not wrap the model
(its FSDP plugin does not run on CPU, where this is tested with gloo). Everything here that gathers is collective:
every process calls it, rank 0 keeps the result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lowtune.errors import UserError
from lowtune.models.load import base_model

OPTIMIZER_FILE = "optimizer_full.pt"
TRAINABLE_FILE = "trainable_full.safetensors"


def shard(model: Any) -> Any:
    """fully_shard every decoder layer, then the model (embeddings, final norm and head form the root unit)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"train.distributed=fsdp: no decoder layers at model.layers in {type(base).__name__}; "
                        "use train.distributed=ddp for this model")
    device = next(base.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(base, mesh=mesh)
    return model


def set_gradient_sync(model: Any, sync: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step (gradients accumulate unsharded)."""
    base = base_model(model)
    base.set_requires_gradient_sync(sync)


def reshard(model: Any) -> None:
    """Put every unit back in its sharded state. The root unit stays gathered after a forward that had no backward
    (eval, sample answers), and its gathered parameters are not the objects the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters, unsharded, on the CPU of rank 0 (empty elsewhere); names as in named_parameters."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    keep = dist.get_rank() == 0
    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if keep:
            state[name] = full.detach().to("cpu", copy=True)
    return state


def full_optimizer_state(model: Any, optimizer: Any) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(model)
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: Any, optimizer: Any, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Put rank 0's full trainable weights and optimizer state back into the shards of every process."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    reshard(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

"""What the loop does differently when weights are sharded over processes, behind operations that are plain
(or nothing) when they are not. Whether a run is sharded is decided once, in the device plan (`plan.sharded`).

Sharded data parallel (`train.distributed: fsdp`): weights, gradients and optimizer states are split over the
processes, and each decoder layer is gathered only while it runs (PyTorch FSDP2, `fully_shard`).

Layer 2 (train). accelerate still provides autocast, the process group and reductions, but does not wrap a sharded
model (its FSDP plugin does not run on CPU, where this is tested with gloo). Everything here that gathers is
collective: every process calls it, rank 0 keeps the result.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lowtune.errors import UserError
from lowtune.models.load import base_model
from lowtune.train.plan import DevicePlan

if TYPE_CHECKING:
    from accelerate import Accelerator

OPTIMIZER_FILE = "optimizer_full.pt"
TRAINABLE_FILE = "trainable_full.safetensors"


# --- what the loop calls: the same on every run -------------------------------------------------------------------

def shard(model: Any, plan: DevicePlan) -> Any:
    """Sharded: fully_shard every decoder layer, then the model (embeddings, final norm and head form the root
    unit). Before the optimizer is built: sharding replaces the parameters."""
    if not plan.sharded:
        return model
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


def prepare(accelerator: Accelerator, model: Any, optimizer: Any, plan: DevicePlan) -> tuple[Any, Any]:
    """accelerate places the model (wrapped in DDP on several processes) and the optimizer; a sharded model is
    already placed, and accelerate would wrap it in DDP too."""
    if plan.sharded:
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def gradient_sync(accelerator: Accelerator, model: Any, plan: DevicePlan, sync: bool) -> AbstractContextManager:
    """Around one micro-batch's backward: gradients are reduced over the processes only when `sync` (the last
    micro-batch of a step); the others accumulate locally. Nothing to do on one process."""
    if plan.sharded:
        base_model(model).set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else accelerator.no_sync(model)


def clip_gradients(accelerator: Accelerator, model: Any, max_norm: float) -> float:
    """Clip the trainable gradients to `max_norm` (0 = no clipping); returns their norm before clipping."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # sharded: the norm is a DTensor


def answers_here(accelerator: Accelerator, plan: DevicePlan) -> bool:
    """Whether this process generates the sample answers: rank 0, which writes them, and under sharding every
    process (the layers gather collectively, so all run the same forwards)."""
    return accelerator.is_main_process or plan.sharded


def gathered_weights(model: Any, plan: DevicePlan) -> dict[str, torch.Tensor] | None:
    """For saving a sharded model: its full trainable weights on rank 0 (collective); None when the model holds
    whole weights and saves its own."""
    return full_trainable_state(model) if plan.sharded else None


# --- gathering and scattering full states (sharded runs only) -----------------------------------------------------


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

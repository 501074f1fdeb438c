"""How a run uses its device: micro-batch split, checkpointing, activation offload, optimizer states, compile,
attention kernel, loss path, and whether the weights are sharded over processes. Every `auto` setting in `train:`
is decided here, once, before the model loads (the loss path is confirmed once the model exists).

Layer 2 (train). On a GPU every candidate (micro-batch x checkpointing x offload x optimizer states) is ranked by
forecast tokens/s (models/memory.py: fixed cost per micro-batch + FLOPs at an assumed MFU, recomputation and host
copies priced) and the fastest whose forecast peak fits is taken; measured peaks (models/calibration.py) correct
the forecast and narrow the safety margin where it proved accurate. 8-bit optimizer states only when they buy
speed. The optimizer always sees batch_size x grad_accum rows per step, so the choice changes speed and memory,
never the maths (the loss is token-normalised per step). On CPU the config is taken as written, `auto` meaning off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lowtune.config import Config
from lowtune.errors import UserError
from lowtune.kernels import LOSS_PATHS, has_plain_head
from lowtune.kernels.loss import fused_loss_available
from lowtune.models.calibration import Calibration, load_calibration
from lowtune.models.load import compute_dtype
from lowtune.models.memory import (
    DEFAULT_TFLOPS,
    GIB,
    USABLE_SHARE,
    MemoryPlan,
    Shape,
    long_rows,
    matmul_tflops,
    mlp_tiles,
    mode_name,
    plan_memory,
)


@dataclass(frozen=True)
class DevicePlan:
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    offload: bool
    optimizer: str
    compile: bool
    attention: str
    """attn_implementation passed to transformers."""
    flat_batches: bool
    """Micro-batches are concatenated into one row with per-sample boundaries (varlen attention, no padding)."""
    memory: MemoryPlan | None = None
    fit_hint: str = ""
    """What to change when the forecast does not fit."""
    loss: str = "chunked"
    """How the loss is computed, a key of kernels.LOSS_PATHS."""
    mlp_tiles: int = 1
    """Sequence tiles of each layer's MLP (kernels/tiled.py); 1: untiled."""
    processes: int = 1
    sharded: bool = False
    """train.distributed=fsdp over several processes: weights, gradients and optimizer states are split
    (train/shard.py); every other run holds whole weights."""

    def describe(self) -> str:
        mode = mode_name(self.checkpointing, self.offload)
        extras = [self.attention] + (["compiled layers"] if self.compile else []) + (
            ["padding-free batches"] if self.flat_batches else []) + (
            [f"MLP in {self.mlp_tiles} sequence tiles"] if self.mlp_tiles > 1 else []) + [LOSS_PATHS[self.loss]]
        text = (f"device plan: micro-batch {self.micro_batch} x accumulation {self.grad_accum}, {mode}, "
                f"optimizer {self.optimizer}, {', '.join(extras)}")
        if self.sharded:
            text += f"\n      weights, gradients and optimizer states sharded over {self.processes} processes (FSDP)"
        if self.memory is not None:
            m = self.memory
            text += f"\n      forecast peak {m.peak_bytes / GIB:.1f} GiB of {m.limit_bytes / GIB:.1f} GiB usable" \
                    + (f" ({m.calibration})" if m.calibration else "") \
                    + f", forecast {m.tokens_per_s:,.0f} tokens/s"
            if not self.memory.fits:
                text += f" - may run out of memory: {self.fit_hint}"
        return text

    def for_model(self, model: Any) -> DevicePlan:
        """The plan once the model is built: a head the chunked loss cannot read takes the logits path."""
        return self if self.loss == "logits" or has_plain_head(model) else replace(self, loss="logits")


def rows_per_step(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum


def check_micro_batch(cfg: Config) -> None:
    micro = cfg.train.micro_batch
    if micro != "auto" and rows_per_step(cfg) % micro:
        raise UserError(f"train.micro_batch={micro} must divide train.batch_size x train.grad_accum = "
                        f"{rows_per_step(cfg)} rows per step")


def _as_bool(value: bool | str, auto: bool) -> bool:
    return auto if value == "auto" else bool(value)


def gpu_capacity_bytes() -> int:
    """Free memory of the current GPU that this process may use (respects set_per_process_memory_fraction)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = getter() if getter else 1.0
    allowed = fraction * total - torch.cuda.memory_allocated()
    return int(USABLE_SHARE * min(free, allowed))


def device_tflops() -> float:
    """The current GPU's matmul rate for the speed forecast (DEFAULT_TFLOPS for one the table does not know)."""
    import torch

    known = matmul_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    return known or DEFAULT_TFLOPS


def triton_supported() -> bool:
    """torch.compile's GPU code generator (Triton) needs compute capability 7.0 or newer (Volta on)."""
    import torch

    return torch.cuda.get_device_capability() >= (7, 0)


def tiles_for(cfg: Config, seq_len: int, micro_batch: int, auto: bool) -> int:
    """MLP tiles (train.tiled_mlp): true tiles in at least two; `auto` tiles rows longer than MLP_TILE_TOKENS where
    `auto` is True (GPU), as the memory forecast assumes; false never."""
    tokens = micro_batch * seq_len
    if cfg.train.tiled_mlp is True:
        return max(2, mlp_tiles(tokens))
    return mlp_tiles(tokens) if cfg.train.tiled_mlp == "auto" and auto and long_rows(seq_len) else 1


def _cpu_plan(cfg: Config, seq_len: int) -> DevicePlan:
    micro = cfg.train.batch_size if cfg.train.micro_batch == "auto" else cfg.train.micro_batch
    checkpointing = _as_bool(cfg.train.gradient_checkpointing, False)
    return DevicePlan(micro_batch=micro, grad_accum=rows_per_step(cfg) // micro, checkpointing=checkpointing,
                      offload=checkpointing and _as_bool(cfg.train.offload_activations, False),
                      optimizer="adamw" if cfg.train.optimizer == "auto" else cfg.train.optimizer,
                      compile=_as_bool(cfg.train.compile, False), attention="sdpa", flat_batches=False,
                      mlp_tiles=tiles_for(cfg, seq_len, micro, auto=False))


def memory_plan(cfg: Config, shape: Shape, seq_len: int, capacity: int, tflops: float = DEFAULT_TFLOPS,
                calibration: Calibration | None = None) -> MemoryPlan:
    """The memory plan for the train section: its fixed choices kept, every `auto` picked for `capacity`, ranked by
    forecast speed at `tflops`, the forecast corrected by measured peaks (the shipped ones unless given)."""
    t = cfg.train
    return plan_memory(shape, capacity_bytes=capacity, seq_len=seq_len, rows_per_step=rows_per_step(cfg),
                       calibration=load_calibration() if calibration is None else calibration, tflops=tflops,
                       quantization=cfg.model.quantization, lora_r=cfg.lora.r if cfg.lora.enabled else None,
                       optimizer=t.optimizer, micro_batch=None if t.micro_batch == "auto" else t.micro_batch,
                       checkpointing=None if t.gradient_checkpointing == "auto" else bool(t.gradient_checkpointing),
                       offload=None if t.offload_activations == "auto" else bool(t.offload_activations))


def fit_hint(cfg: Config) -> str:
    """The settings to change when the forecast exceeds the GPU, starting with any the config fixed by hand."""
    t, fixes = cfg.train, []
    if t.micro_batch != "auto":
        fixes.append("train.micro_batch=auto")
    if t.gradient_checkpointing is False or t.offload_activations is False:
        fixes.append("train.gradient_checkpointing=auto train.offload_activations=auto")
    fixes.append("a lower data.max_length" + (" or lora.r" if cfg.lora.enabled else ""))
    if cfg.model.quantization == "none":
        fixes.append("model.quantization=nf4")
    return "try " + ", ".join(fixes)


def _gpu_plan(cfg: Config, model_dir: Path, seq_len: int, capacity: int) -> DevicePlan:
    from lowtune.kernels.attention import register, varlen_available

    shape = Shape.from_config(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    memory = memory_plan(cfg, shape, seq_len, capacity, device_tflops())
    optimizer = memory.optimizer
    if optimizer.endswith("8bit") or optimizer.startswith("paged"):
        try:
            import bitsandbytes  # noqa: F401  (8-bit states need it; fall back to AdamW without)
        except ImportError:
            optimizer = "adamw"
    varlen = varlen_available()
    return DevicePlan(micro_batch=memory.micro_batch, grad_accum=memory.grad_accum,
                      checkpointing=memory.checkpointing, offload=memory.offload, optimizer=optimizer,
                      compile=_as_bool(cfg.train.compile, triton_supported() and cfg.train.distributed != "fsdp"),
                      attention=register() if varlen else "sdpa", flat_batches=varlen, memory=memory,
                      fit_hint=fit_hint(cfg), mlp_tiles=tiles_for(cfg, seq_len, memory.micro_batch, auto=True))


def plan_device(cfg: Config, model_dir: Path, device: Any, seq_len: int, processes: int = 1) -> DevicePlan:
    """Resolve every `auto` of the train section for this device; `seq_len` = longest row of the data."""
    import torch

    check_micro_batch(cfg)
    sharded = cfg.train.distributed == "fsdp" and processes > 1
    if sharded and compute_dtype(cfg.model.dtype, str(device)) == torch.float16:
        raise UserError("train.distributed=fsdp needs bf16 (Ampere or newer GPUs) or fp32: fp16 loss scaling is "
                        "not sharded; use train.distributed=ddp or model.dtype=fp32")
    cuda = str(device).startswith("cuda")
    plan = _gpu_plan(cfg, Path(model_dir), seq_len, gpu_capacity_bytes()) if cuda else _cpu_plan(cfg, seq_len)
    # a sharded head's weight is gathered only inside the model's own forward
    loss = "logits" if sharded else "fused" if cuda and fused_loss_available() else "chunked"
    return replace(plan, loss=loss, processes=processes, sharded=sharded)

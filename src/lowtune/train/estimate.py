"""`lowtune estimate`: peak memory and time forecast for a config on a GPU, and the plan `train` would pick.

Layer 2 (train). Reads only the model's config.json (no weights) and, when the data files exist, their token
counts (the same cached tokenisation `train` uses). Memory comes from models/memory.py; speed from the MFU that
each mode reached on an H200 (bench/RESULTS.md) scaled by the GPU's bf16 rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lowtune.config import Config
from lowtune.errors import UserError
from lowtune.models.calibration import load_calibration
from lowtune.models.memory import (
    GIB,
    MODE_SPEED,
    MemoryPlan,
    Shape,
    known_shape,
    matmul_tflops,
    plan_memory,
    speed_score,
)
from lowtune.models.resolve import LOCAL_FOLDER, check_not_mistyped, is_hub_id, missing_folder_error, resolve_model_dir
from lowtune.train.plan import USABLE_SHARE, fit_hint, gpu_capacity_bytes, memory_plan, rows_per_step

if TYPE_CHECKING:
    from rich.console import Console

# Share of that rate a training step reached, by (checkpointing, offload), at MFU_TOKENS per micro-batch; measured on
# an H200 (bench/RESULTS.md: 54.5% without checkpointing at 4 x 2048 tokens, 28.7% with checkpointing + offload at
# 2 x 2048; checkpointing alone was within 2% of offloading, so it is put just above). Other micro-batch sizes are
# scaled by models/memory.speed_score: InternLM-Chat-7B at 1 x 2048 with offload then forecasts 18% (measured 17.0%).
MODE_MFU = {(False, False): 0.54, (True, False): 0.28, (True, True): 0.27}
MFU_TOKENS = {(False, False): 8192, (True, False): 4096, (True, True): 4096}


def mfu(plan: MemoryPlan, seq: int) -> float:
    """Forecast share of the GPU's matmul rate for this plan's mode and tokens per micro-batch."""
    mode = (plan.checkpointing, plan.offload)
    return MODE_MFU[mode] * speed_score(plan.micro_batch * seq, *mode) / speed_score(MFU_TOKENS[mode], *mode)


def tokens_per_second(plan: MemoryPlan, shape: Shape, seq: int, gpu_name: str, full: bool) -> float | None:
    """Forecast training speed of this plan on a GPU of that name; None for a GPU the table does not know."""
    tflops = _tflops(gpu_name)
    return mfu(plan, seq) * tflops * 1e12 / shape.flops_per_token(seq, full=full) if tflops else None


def row_tokens(cfg: Config) -> int:
    """Tokens of one row as the planner sizes it: data.max_length (2048 when unset), doubled for preference
    tuning, whose rows hold both answers of a pair."""
    return (cfg.data.max_length or 2048) * (1 if cfg.train.method == "sft" else 2)


def fit_summary(cfg: Config, shape: Shape, capacity: int, gpu_name: str) -> str:
    """One line: whether the config trains in `capacity` bytes, with what plan and at about what speed."""
    seq = row_tokens(cfg)
    plan = memory_plan(cfg, shape, seq, capacity)
    peak = f"forecast peak {plan.peak_bytes / GIB:.1f} of {capacity / GIB:.1f} GiB usable"
    if not plan.fits:
        return f"does not fit ({peak}): {fit_hint(cfg)}"
    mode = "checkpointing + offload" if plan.offload else ("checkpointing" if plan.checkpointing else
                                                          "no checkpointing")
    rate = tokens_per_second(plan, shape, seq, gpu_name, full=not cfg.lora.enabled)
    return (f"fits: micro-batch {plan.micro_batch}, {mode}, {plan.optimizer}, {peak}"
            + (f", about {rate:,.0f} tokens/s" if rate else ""))


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(1, round(seconds / 60))} min"


def _shape(model_dir: Path) -> Shape:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    try:
        return Shape.from_config(config)
    except KeyError as exc:
        raise UserError(f"{model_dir / 'config.json'}: no {exc} key; estimate knows Llama-style configs "
                        "(num_hidden_layers, hidden_size, vocab_size)") from None


def _model(cfg: Config) -> tuple[Path | None, Shape]:
    """(folder, shape) of the model; a recipe's model that is not downloaded yet is planned from its published
    shape (no folder, so no data tokens)."""
    spec = cfg.model.path
    check_not_mistyped(spec)
    if not Path(spec).exists() and (is_hub_id(spec) or spec.startswith(LOCAL_FOLDER)):
        shape = known_shape(spec)
        if shape is None and not is_hub_id(spec):
            raise missing_folder_error(spec)
        if shape is None:
            raise UserError(f"model.path={spec} is not downloaded yet; estimate reads its config.json: "
                            f"lowtune download {spec} -o models/NAME, then model.path=models/NAME")
        return None, shape
    model_dir = resolve_model_dir(spec, cfg.model.hub, cfg.model.revision, cfg.model.trust_remote_code)
    return model_dir, _shape(model_dir)


def _gpu() -> tuple[str, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), gpu_capacity_bytes()


def _tflops(name: str) -> float | None:
    return matmul_tflops(name)


def _data_tokens(cfg: Config, model_dir: Path) -> int | None:
    if not cfg.data.train or not all(Path(p).exists() for p in cfg.data.train):
        return None
    from lowtune.data.dataset import build_dataset
    from lowtune.models.load import load_tokenizer
    from lowtune.templates import resolve_template

    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    data = build_dataset(cfg, tokenizer, resolve_template(cfg.model.template, tokenizer, model_dir))
    return sum(len(row["input_ids"]) for row in data.train)


def estimate(cfg: Config, gpu_memory_gib: float | None, console: Console) -> int:
    from rich.table import Table

    model_dir, shape = _model(cfg)
    if model_dir is None:
        console.print(f"{cfg.model.path} is not here yet: planning with its published shape ({shape.layers} layers, "
                      f"hidden {shape.hidden}, vocabulary {shape.vocab})", markup=False, soft_wrap=True)
    gpu = _gpu()
    if gpu_memory_gib is not None:
        name, capacity = (gpu[0] if gpu else "GPU"), int(USABLE_SHARE * gpu_memory_gib * GIB)
    elif gpu is not None:
        name, capacity = gpu
    else:
        name, capacity = "no GPU here: an 8 GiB card assumed", int(USABLE_SHARE * 8 * GIB)
    seq = row_tokens(cfg)
    lora_r = cfg.lora.r if cfg.lora.enabled else None
    rows = rows_per_step(cfg)
    plan = memory_plan(cfg, shape, seq, capacity)
    table = Table(title=f"{cfg.model.path}: {cfg.model.quantization} {'LoRA r%d' % lora_r if lora_r else 'full'}"
                        f", {seq} tokens x {rows} rows per step, {name}", title_justify="left")
    for column in ("setting", "micro-batch", "optimizer", "peak GiB", "fits"):
        table.add_column(column)
    micro = None if cfg.train.micro_batch == "auto" else cfg.train.micro_batch
    calibration = load_calibration()  # the rows agree with the plan line below
    for optimizer in (["adamw", "paged_adamw_8bit"] if cfg.train.optimizer == "auto" else [cfg.train.optimizer]):
        for checkpointing, offload in MODE_SPEED:  # each row: the fastest micro-batch of that setting that fits
            row = plan_memory(shape, capacity_bytes=capacity, seq_len=seq, rows_per_step=rows,
                              quantization=cfg.model.quantization, lora_r=lora_r, optimizer=optimizer,
                              micro_batch=micro, checkpointing=checkpointing, offload=offload,
                              calibration=calibration)
            label = "checkpointing + offload" if offload else ("checkpointing" if checkpointing else "none")
            table.add_row(label, str(row.micro_batch), optimizer, f"{row.peak_bytes / GIB:.2f}",
                          "yes" if row.fits else "no")
    console.print(table)
    console.print(plan.describe(), markup=False, soft_wrap=True)
    tokens = _data_tokens(cfg, model_dir) if model_dir is not None else None
    rate = tokens_per_second(plan, shape, seq, name, full=lora_r is None)
    if rate and plan.fits:
        line = f"speed forecast: about {rate:,.0f} tokens/s"
        if tokens:
            epochs = cfg.train.epochs if not cfg.train.max_steps else None
            total = tokens * epochs if epochs else cfg.train.max_steps * rows * seq
            line += f"; {tokens:,} tokens per epoch -> about {duration(total / rate)}"
        console.print(line, markup=False, soft_wrap=True)
    elif tokens:
        console.print(f"{tokens:,} tokens per epoch (no speed forecast for {name})", markup=False)
    if not plan.fits:
        console.print(f"does not fit: {fit_hint(cfg)}", markup=False, soft_wrap=True)
    return 0

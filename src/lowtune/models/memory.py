"""Memory forecast and plan for training a model of a given shape: weights, adapter state, activations.

Layer 1: pure arithmetic on config.json values, no weights loaded. Training asks `plan_memory` for the fastest
micro-batch / checkpointing / offloading / optimizer-state choice that fits the device, ranked by a forecast of
tokens/s (`forecast_tokens_per_s`: fixed cost per micro-batch + matmul FLOPs at an assumed MFU, recomputation and
host copies priced); measured peaks (models/calibration.py) correct the memory forecast and narrow its safety
margin where it proved accurate. `lowtune estimate` prints the same numbers. Activation sizes are calibrated on a
Llama-2-7B-shaped model on an H200 (bench/RESULTS.md): with fused RMSNorm/SwiGLU/RoPE and fused linear
cross-entropy, one decoder layer keeps about 2 x (16 d + 6 ff) bytes per token for backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

GIB = 2**30
NF4_BYTES_PER_PARAM = 4.127 / 8  # NF4 + double quantisation (QLoRA paper)
WORKSPACE_BYTES = int(0.35 * GIB)  # allocator slack, cuBLAS workspace, one chunk of fused cross-entropy
OPTIMIZER_BYTES_PER_PARAM = {  # fp32 master weight + fp32 grad + optimizer state in the allocator
    "adamw": 4 + 4 + 8, "adamw_8bit": 4 + 4 + 2,
    # paged states live in CUDA unified memory, evicted to the host under pressure: not in the allocator's peak
    "paged_adamw": 4 + 4, "paged_adamw_8bit": 4 + 4,
}
MLP_TILE_TOKENS = 8192  # tiled MLP (kernels/tiled.py): rows longer than this run their MLP in tiles of this size
MAX_TOKENS_PER_MICRO_BATCH = 16384  # beyond this, GEMMs are saturated and memory is better spent elsewhere
HALF_SPEED_TOKENS = 4096  # micro-batch size at which a 7B step reaches about half its large-batch speed (H200)
MODE_SPEED = {(False, False): 1.0, (True, False): 0.75, (True, True): 0.7}  # no ckpt / ckpt / ckpt + offload
USABLE_SHARE = 0.8  # of free GPU memory an uncalibrated forecast may take: CUDA context, fragmentation, others

# The speed model that ranks plans (documented in docs/decisions.md, fitted to bench/RESULTS.md). One micro-batch
# of t tokens takes MICRO_BATCH_OVERHEAD_S[mode] + t x FLOPs/token x recompute / (GPU rate x LARGE_MATMUL_MFU)
# + the host copies of offloaded layer inputs. Measured on an H100 (Llama-2-7B shape, QLoRA, 2048): micro-batch 4 no
# checkpointing 14,828 tok/s, micro-batch 8 checkpointing 10,529; forecast 15,045 and 9,909. Capped rows: -17% to +9%.
# Dense bf16 (fp16 where bf16 is missing) TFLOP/s that a large matmul reaches, by GPU name fragment.
MATMUL_TFLOPS = {"H200": 790, "H100": 750, "A100": 280, "L40": 300, "A10": 110, "4090": 150, "3090": 65,
                 "4080": 100, "3080": 55, "4070": 60, "3060": 25, "T4": 45, "V100": 90, "A6000": 140}
DEFAULT_TFLOPS = 750.0  # dense bf16 rate of an H100; only the ratio of compute to fixed cost depends on it
LARGE_MATMUL_MFU = 0.62  # share of that rate the matmuls of a large micro-batch reach (compiled layers)
MICRO_BATCH_OVERHEAD_S = {(False, False): 0.06, (True, False): 0.2, (True, True): 0.2}
"""Fixed seconds per micro-batch: launches, the loss chunks, the host side; checkpointed layers re-enter Python
per layer (the capped plan was host-bound in torch.profiler, bench/RESULTS.md)."""
HOST_COPY_BYTES_PER_S = 50e9  # pinned host <-> device copies of offloaded layer inputs (0.33 s per 7B step, H200)
SPEED_TOLERANCE = 0.07  # forecasts this close are a tie: the model ranks, its last percent is not trusted
EAGER_SLOWDOWN = 1.1  # layers run without torch.compile: 14,270 vs 15,685 tok/s (bench/RESULTS.md)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        heads = config.get("num_attention_heads", 32)
        return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                   intermediate=config.get("intermediate_size", 4 * config["hidden_size"]), heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven projections of one decoder layer."""
        d, f, kv = self.hidden, self.intermediate, self.kv_dim
        return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def flops_per_token(self, seq_len: int, full: bool = False) -> float:
        """Model FLOPs per trained token: 4N (+2N for full fine-tuning) plus causal attention."""
        n = self.linear_params + self.vocab * self.hidden
        attention = 4 * self.layers * self.hidden * seq_len  # QK^T and PV, forward + input-grad, causal half
        return (6 if full else 4) * n + attention


def matmul_tflops(gpu_name: str) -> float | None:
    """The MATMUL_TFLOPS entry of a GPU by its name; None for one the table does not know."""
    return next((v for k, v in MATMUL_TFLOPS.items() if k in gpu_name), None)


def known_shape(spec: str) -> Shape | None:
    """The published shape of a recipe's model, by its repository or folder name, for planning before download."""
    return KNOWN_SHAPES.get(spec.rstrip("/").rsplit("/", 1)[-1].lower())


def mode_name(checkpointing: bool, offload: bool) -> str:
    return "checkpointing + CPU offload" if offload else ("checkpointing" if checkpointing else "no checkpointing")


@dataclass(frozen=True)
class Setting:
    """One candidate training setting, as a measured peak records it and the planner weighs it."""
    quantization: str
    lora_r: int | None
    optimizer: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    offload: bool

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


class Corrector(Protocol):
    """Measured peaks (models/calibration.py): the expected peak of a setting and the margin it needs, or None
    where no measurement speaks for it."""

    def correct(self, shape: Shape, setting: Setting, forecast_bytes: int) -> tuple[int, float] | None: ...


@dataclass
class MemoryPlan:
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    offload: bool
    optimizer: str
    peak_bytes: int
    capacity_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    allowed_bytes: int = 0
    """What a calibrated peak may reach (device memory less its margin); 0: `capacity_bytes` (uncalibrated)."""
    calibration: str = ""
    tokens_per_s: float = 0.0
    """Forecast speed the plan was ranked by (relative: at DEFAULT_TFLOPS unless the GPU rate was given)."""

    @property
    def limit_bytes(self) -> int:
        return self.allowed_bytes or self.capacity_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.limit_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.breakdown.items())
        mode = mode_name(self.checkpointing, self.offload)
        text = (f"memory plan: micro-batch {self.micro_batch} x accumulation {self.grad_accum}, {mode}, "
                f"optimizer {self.optimizer}; forecast peak {self.peak_bytes / GIB:.2f} GiB of "
                f"{self.limit_bytes / GIB:.1f} GiB ({parts} GiB)")
        return text + (f"; {self.calibration}" if self.calibration else "")


def weight_bytes(shape: Shape, quantization: str, full_finetune: bool = False,
                 host_input_embeddings: bool = False) -> int:
    """GPU bytes of the model's weights; a frozen, untied input embedding kept on the host costs none."""
    per_linear = {"nf4": NF4_BYTES_PER_PARAM, "int8": 1.0}.get(quantization, 2.0)
    master = 4 if full_finetune else 0  # full fine-tuning keeps fp32 weights
    embeddings = shape.embedding_params
    if host_input_embeddings and not full_finetune and not shape.tied:
        embeddings -= shape.vocab * shape.hidden
    return int(shape.linear_params * (per_linear + master) + embeddings * (2 + master))


def lora_params(shape: Shape, r: int) -> int:
    return shape.layers * sum(r * (i + o) for i, o in shape.linear_shapes())


def long_rows(seq_len: int) -> bool:
    """Whether rows of this length take the tiled MLP by default (train.tiled_mlp=auto on a GPU)."""
    return seq_len > MLP_TILE_TOKENS


def mlp_tiles(tokens: int) -> int:
    """Sequence tiles of the MLP for a micro-batch of `tokens`."""
    return -(-tokens // MLP_TILE_TOKENS)


def layer_activation_bytes(shape: Shape, tokens: int, tiled: bool = False) -> int:
    """What one decoder layer keeps for backward (also the working set when recomputing it); with the tiled MLP
    its ff-wide intermediates exist for one tile of MLP_TILE_TOKENS only."""
    mlp_tokens = min(tokens, MLP_TILE_TOKENS) if tiled else tokens
    return 2 * (16 * shape.hidden * tokens + 6 * shape.intermediate * mlp_tokens)


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, offload: bool, tiled: bool = False) -> int:
    if not checkpointing:
        return shape.layers * layer_activation_bytes(shape, tokens, tiled)
    kept = 0 if offload else shape.layers * 2 * shape.hidden * tokens  # one bf16 hidden state per layer
    return kept + layer_activation_bytes(shape, tokens, tiled)


def forecast(shape: Shape, *, quantization: str, lora_r: int | None, optimizer: str, tokens: int,
             checkpointing: bool, offload: bool, tiled: bool = False) -> dict[str, int]:
    full = lora_r is None
    trainable = shape.linear_params + shape.embedding_params if full else lora_params(shape, lora_r)
    state = trainable * (OPTIMIZER_BYTES_PER_PARAM[optimizer] - (4 if full else 0))
    # the memory-tight mode (offloaded layer inputs) also keeps the input embedding table on the host
    return {"weights": weight_bytes(shape, quantization, full, host_input_embeddings=offload),
            "adapter+optimizer": int(state),
            "activations": activation_bytes(shape, tokens, checkpointing, offload, tiled),
            "workspace": WORKSPACE_BYTES}


def recompute_factor(full: bool) -> float:
    """FLOPs of a checkpointed step over a plain one: the forward (2N) runs twice; backward is 2N for adapters
    (input gradients only) and 4N for full fine-tuning, so 1.5 for LoRA and 1.33 for full."""
    return 1 + 2 / (6 if full else 4)


def tiling_factor(shape: Shape, full: bool) -> float:
    """FLOPs with the tiled MLP over without: its MLP forward runs again in backward (the MLP's share of the
    layer's matmuls times a forward's share of the step)."""
    mlp = 3 * shape.hidden * shape.intermediate
    return 1 + mlp / sum(i * o for i, o in shape.linear_shapes()) * 2 / (6 if full else 4)


def micro_batch_seconds(shape: Shape, *, seq_len: int, micro_batch: int, checkpointing: bool, offload: bool,
                        full: bool = False, compiled: bool = True, tflops: float = DEFAULT_TFLOPS) -> float:
    """Forecast wall time of one micro-batch (forward + backward) under the speed model above."""
    tokens = micro_batch * seq_len
    flops = tokens * shape.flops_per_token(seq_len, full=full) * (recompute_factor(full) if checkpointing else 1)
    flops *= tiling_factor(shape, full) if long_rows(seq_len) else 1
    compute = flops / (tflops * 1e12 * LARGE_MATMUL_MFU) * (1 if compiled else EAGER_SLOWDOWN)
    copies = 2 * shape.layers * shape.hidden * tokens * 2 / HOST_COPY_BYTES_PER_S if offload else 0.0
    return MICRO_BATCH_OVERHEAD_S[(checkpointing, offload)] + compute + copies


def forecast_tokens_per_s(shape: Shape, *, seq_len: int, micro_batch: int, checkpointing: bool, offload: bool,
                          full: bool = False, compiled: bool = True, tflops: float = DEFAULT_TFLOPS) -> float:
    """Forecast training tokens/s of a setting (the optimizer step, once per many micro-batches, is left out)."""
    seconds = micro_batch_seconds(shape, seq_len=seq_len, micro_batch=micro_batch, checkpointing=checkpointing,
                                  offload=offload, full=full, compiled=compiled, tflops=tflops)
    return micro_batch * seq_len / seconds


def speed_score(tokens: int, checkpointing: bool, offload: bool) -> float:
    """Relative training speed of a setting: t / (t + HALF_SPEED_TOKENS) for t tokens per micro-batch, times the
    mode's factor (recomputing costs about a quarter, offloading a little more; measured on an H200,
    bench/RESULTS.md)."""
    return tokens / (tokens + HALF_SPEED_TOKENS) * MODE_SPEED[(checkpointing, offload)]


def candidate_plan(shape: Shape, setting: Setting, *, capacity_bytes: int, rows_per_step: int,
                   calibration: Corrector | None = None, tflops: float = DEFAULT_TFLOPS) -> MemoryPlan:
    """The forecast of one setting: its peak (corrected by measured peaks where they speak for it) and speed."""
    parts = forecast(shape, quantization=setting.quantization, lora_r=setting.lora_r, optimizer=setting.optimizer,
                     tokens=setting.tokens, checkpointing=setting.checkpointing, offload=setting.offload,
                     tiled=long_rows(setting.seq_len))
    peak, allowed, note = sum(parts.values()), 0, ""
    corrected = calibration.correct(shape, setting, peak) if calibration is not None else None
    if corrected is not None:
        peak, margin = corrected
        allowed = int(capacity_bytes / USABLE_SHARE / (1 + margin))
        note = f"calibrated by measured peaks: model forecast {sum(parts.values()) / GIB:.2f} GiB, margin {margin:.0%}"
    speed = forecast_tokens_per_s(shape, seq_len=setting.seq_len, micro_batch=setting.micro_batch,
                                  checkpointing=setting.checkpointing, offload=setting.offload,
                                  full=setting.lora_r is None, tflops=tflops)
    return MemoryPlan(setting.micro_batch, rows_per_step // setting.micro_batch, setting.checkpointing,
                      setting.offload, setting.optimizer, int(peak), capacity_bytes, parts, allowed, note, speed)


def candidate_settings(*, seq_len: int, rows_per_step: int, quantization: str, lora_r: int | None,
                       optimizer: str = "auto", micro_batch: int | None = None, checkpointing: bool | None = None,
                       offload: bool | None = None) -> list[Setting]:
    """Every setting the config leaves open: micro-batches dividing rows_per_step (up to
    MAX_TOKENS_PER_MICRO_BATCH tokens), the three modes, 32-bit then paged 8-bit optimizer states."""
    optimizers = ["adamw", "paged_adamw_8bit"] if optimizer == "auto" else [optimizer]
    micro_options = [micro_batch] if micro_batch else [
        m for m in range(rows_per_step, 0, -1)
        if rows_per_step % m == 0 and (m * seq_len <= MAX_TOKENS_PER_MICRO_BATCH or m == 1)]
    modes = [(ckpt, off) for ckpt, off in MODE_SPEED
             if checkpointing in (None, ckpt) and (not ckpt or offload in (None, off))]
    return [Setting(quantization, lora_r, opt, micro, seq_len, ckpt, off)
            for opt in optimizers for ckpt, off in modes for micro in micro_options]


def rank_plans(plans: list[MemoryPlan]) -> list[MemoryPlan]:
    """Fitting plans fastest first, then the rest leanest first. Plans within SPEED_TOLERANCE of the fastest
    forecast count as equally fast (the model is that accurate, bench/RESULTS.md): among them 32-bit optimizer
    states, then the least memory, come first."""
    fitting = sorted((p for p in plans if p.fits), key=lambda plan: -plan.tokens_per_s)
    best = fitting[0].tokens_per_s if fitting else 0.0
    near = sorted((p for p in fitting if p.tokens_per_s >= best * (1 - SPEED_TOLERANCE)),
                  key=lambda plan: (plan.optimizer != "adamw", plan.peak_bytes))
    rest = [p for p in fitting if p not in near]
    return near + rest + sorted((p for p in plans if not p.fits), key=lambda plan: plan.peak_bytes)


def plan_memory(shape: Shape, *, capacity_bytes: int, seq_len: int, rows_per_step: int, quantization: str,
                lora_r: int | None, optimizer: str = "auto", micro_batch: int | None = None,
                checkpointing: bool | None = None, offload: bool | None = None,
                calibration: Corrector | None = None, tflops: float = DEFAULT_TFLOPS) -> MemoryPlan:
    """The setting forecast to train fastest (`forecast_tokens_per_s`) among those that fit; a choice passed in
    (not None / 'auto') is kept and only the others are searched, so the forecast is always of the setting that
    will run.

    An uncalibrated forecast must fit `capacity_bytes` (USABLE_SHARE of free memory); one that measured peaks
    correct must fit the device less the calibration's margin. The micro-batch always divides rows_per_step
    (batch_size x grad_accum), so the optimizer sees the same rows. When nothing fits, the leanest setting is
    returned (its `fits` is False). Offloading applies only with checkpointing.
    """
    settings = candidate_settings(seq_len=seq_len, rows_per_step=rows_per_step, quantization=quantization,
                                  lora_r=lora_r, optimizer=optimizer, micro_batch=micro_batch,
                                  checkpointing=checkpointing, offload=offload)
    plans = [candidate_plan(shape, s, capacity_bytes=capacity_bytes, rows_per_step=rows_per_step,
                            calibration=calibration, tflops=tflops) for s in settings]
    return rank_plans(plans)[0]


# config.json values of the models the shipped recipes name (their published configs)
KNOWN_SHAPES = {
    "internlm-chat-7b": Shape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=103168),
    "internlm-7b": Shape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=103168),
    "internlm2-chat-7b": Shape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=92544),
    "qwen-7b-chat": Shape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=151936),
    "baichuan2-7b-chat": Shape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=125696),
    "meta-llama-3-8b-instruct": Shape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                                      vocab=128256),
    "qwen2-7b-instruct": Shape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064),
}

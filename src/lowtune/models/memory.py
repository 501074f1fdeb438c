"""Memory forecast and plan for training a model of a given shape: weights, adapter state, activations.

Layer 1: pure arithmetic on config.json values, no weights loaded. Training asks `plan_memory` for the fastest
micro-batch / checkpointing / offloading / optimizer-state choice that fits the device; `lowtune estimate`
prints the same numbers. Activation sizes are calibrated on a Llama-2-7B-shaped model on an H200 (bench/RESULTS.md):
with fused RMSNorm/SwiGLU/RoPE and fused linear cross-entropy, one decoder layer keeps about
2 x (16 d + 6 ff) bytes per token for backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
NF4_BYTES_PER_PARAM = 4.127 / 8  # NF4 + double quantisation (QLoRA paper)
WORKSPACE_BYTES = int(0.35 * GIB)  # allocator slack, cuBLAS workspace, one chunk of fused cross-entropy
OPTIMIZER_BYTES_PER_PARAM = {  # fp32 master weight + fp32 grad + optimizer state in the allocator
    "adamw": 4 + 4 + 8, "adamw_8bit": 4 + 4 + 2,
    # paged states live in CUDA unified memory, evicted to the host under pressure: not in the allocator's peak
    "paged_adamw": 4 + 4, "paged_adamw_8bit": 4 + 4,
}
MAX_TOKENS_PER_MICRO_BATCH = 16384  # beyond this, GEMMs are saturated and memory is better spent elsewhere
HALF_SPEED_TOKENS = 4096  # micro-batch size at which a 7B step reaches about half its large-batch speed (H200)
MODE_SPEED = {(False, False): 1.0, (True, False): 0.75, (True, True): 0.7}  # no ckpt / ckpt / ckpt + offload


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


def known_shape(spec: str) -> Shape | None:
    """The published shape of a recipe's model, by its repository or folder name, for planning before download."""
    return KNOWN_SHAPES.get(spec.rstrip("/").rsplit("/", 1)[-1].lower())


def mode_name(checkpointing: bool, offload: bool) -> str:
    return "checkpointing + CPU offload" if offload else ("checkpointing" if checkpointing else "no checkpointing")


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

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.breakdown.items())
        mode = mode_name(self.checkpointing, self.offload)
        return (f"memory plan: micro-batch {self.micro_batch} x accumulation {self.grad_accum}, {mode}, "
                f"optimizer {self.optimizer}; forecast peak {self.peak_bytes / GIB:.2f} GiB of "
                f"{self.capacity_bytes / GIB:.1f} GiB ({parts} GiB)")


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


def layer_activation_bytes(shape: Shape, tokens: int) -> int:
    """What one decoder layer keeps for backward (also the working set when recomputing it)."""
    return 2 * (16 * shape.hidden + 6 * shape.intermediate) * tokens


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, offload: bool) -> int:
    if not checkpointing:
        return shape.layers * layer_activation_bytes(shape, tokens)
    kept = 0 if offload else shape.layers * 2 * shape.hidden * tokens  # one bf16 hidden state per layer
    return kept + layer_activation_bytes(shape, tokens)


def forecast(shape: Shape, *, quantization: str, lora_r: int | None, optimizer: str, tokens: int,
             checkpointing: bool, offload: bool) -> dict[str, int]:
    full = lora_r is None
    trainable = shape.linear_params + shape.embedding_params if full else lora_params(shape, lora_r)
    state = trainable * (OPTIMIZER_BYTES_PER_PARAM[optimizer] - (4 if full else 0))
    # the memory-tight mode (offloaded layer inputs) also keeps the input embedding table on the host
    return {"weights": weight_bytes(shape, quantization, full, host_input_embeddings=offload),
            "adapter+optimizer": int(state),
            "activations": activation_bytes(shape, tokens, checkpointing, offload), "workspace": WORKSPACE_BYTES}


def speed_score(tokens: int, checkpointing: bool, offload: bool) -> float:
    """Relative training speed of a setting: t / (t + HALF_SPEED_TOKENS) for t tokens per micro-batch, times the
    mode's factor (recomputing costs about a quarter, offloading a little more; measured on an H200,
    bench/RESULTS.md)."""
    return tokens / (tokens + HALF_SPEED_TOKENS) * MODE_SPEED[(checkpointing, offload)]


def plan_memory(shape: Shape, *, capacity_bytes: int, seq_len: int, rows_per_step: int, quantization: str,
                lora_r: int | None, optimizer: str = "auto", micro_batch: int | None = None,
                checkpointing: bool | None = None, offload: bool | None = None) -> MemoryPlan:
    """The setting expected to train fastest among those that fit; a choice passed in (not None / 'auto') is kept
    and only the others are searched, so the forecast is always of the setting that will run.

    Bigger micro-batches win while the GPU is far from saturated, then skipping recomputation wins (`speed_score`).
    Ties go to 32-bit optimizer states, then to less memory. The micro-batch always divides rows_per_step
    (batch_size x grad_accum), so the optimizer sees the same rows. When nothing fits, the leanest setting is
    returned (its `fits` is False). Offloading applies only with checkpointing.
    """
    optimizers = ["adamw", "paged_adamw_8bit"] if optimizer == "auto" else [optimizer]
    micro_options = [micro_batch] if micro_batch else [
        m for m in range(rows_per_step, 0, -1)
        if rows_per_step % m == 0 and (m * seq_len <= MAX_TOKENS_PER_MICRO_BATCH or m == 1)]
    modes = [(ckpt, off) for ckpt, off in MODE_SPEED
             if checkpointing in (None, ckpt) and (not ckpt or offload in (None, off))]
    plans = []
    for rank, opt in enumerate(optimizers):
        for ckpt, off in modes:
            for micro in micro_options:
                parts = forecast(shape, quantization=quantization, lora_r=lora_r, optimizer=opt,
                                 tokens=micro * seq_len, checkpointing=ckpt, offload=off)
                plan = MemoryPlan(micro, rows_per_step // micro, ckpt, off, opt, sum(parts.values()),
                                  capacity_bytes, parts)
                plans.append((plan, (speed_score(micro * seq_len, ckpt, off), -rank, -plan.peak_bytes)))
    fitting = [(plan, score) for plan, score in plans if plan.fits]
    if fitting:
        return max(fitting, key=lambda item: item[1])[0]
    return min((plan for plan, _ in plans), key=lambda plan: plan.peak_bytes)


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

"""The training loop: one readable path from a config to a finished run folder.

Layer 2 (train); never imports infer or export. Order: reject bad settings (no model yet) -> tokenizer, template,
data -> `--dry-run` stops here -> accelerate, device plan (every `auto`, the loss path and sharding decided once) ->
the run state (model, LoRA, optimizer, schedule) -> resume -> steps (eval loss and sample answers every eval.every,
a checkpoint every save_every) -> adapter/ or model/, loss.png. Whatever differs on sharded runs sits behind
train/shard.py, whose operations are plain on one device.

Loss is token-normalised over the whole accumulation window: the summed token losses of every micro-batch are
divided by the window's supervised-token count, so batch 8 x accumulation 1 equals batch 1 x accumulation 8.
Preference runs (train.method dpo/orpo/simpo, train/preference.py) take the same steps over rows of whole pairs,
with the summed pair losses divided by the window's pair count.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.config import Config, check_combination, config_changes, dump_config
from lowtune.data.collate import collate, collate_flat, target_count, token_count
from lowtune.data.dataset import TrainData, build_dataset
from lowtune.data.pairs import pair_source
from lowtune.data.preference import build_pair_dataset, pair_count
from lowtune.errors import UserError, require
from lowtune.kernels import causal_lm_loss_sum, compile_layers, enable_fast_path
from lowtune.kernels.preference import PreferenceSettings
from lowtune.kernels.tiled import tile_mlps
from lowtune.models.load import (
    apply_lora,
    compute_dtype,
    count_parameters,
    count_parameters_without_weights,
    default_device,
    load_model,
    load_tokenizer,
)
from lowtune.models.placement import keep_input_embeddings_on_host
from lowtune.models.resolve import resolve_model_dir
from lowtune.runs import RunFolder, atomic_write_text
from lowtune.templates import ChatTemplate, resolve_template, shipped
from lowtune.train.batches import StepPlan
from lowtune.train.checkpoint import find_resume, install_weight_hooks, load_checkpoint, save_checkpoint
from lowtune.train.observe import (
    ProgressBar,
    Recorder,
    Throughput,
    check_trackers,
    format_eta,
    peak_memory_gb,
    truncate_jsonl,
    write_samples,
)
from lowtune.train.optim import build_optimizer, build_scheduler, check_optimizer
from lowtune.train.outputs import export_weights, library_versions, write_run_header
from lowtune.train.plan import DevicePlan, check_micro_batch, fit_hint, plan_device
from lowtune.train.plot import plot_loss
from lowtune.train.preference import eval_pairs, make_pair_batch, metric_means, pair_loss_sum, precompute_reference
from lowtune.train.replay import base_answers, cache_path, read_answers, replay_applies
from lowtune.train.shard import answers_here, clip_gradients, gathered_weights, gradient_sync, prepare, shard
from lowtune.train.state import RunState

if TYPE_CHECKING:
    from accelerate import Accelerator
    from rich.console import Console


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    """Optimizer steps reached (the total when training finished)."""
    losses: list[float] = field(default_factory=list)
    """Training loss of each step this call ran."""
    trainable: int = 0
    total: int = 0
    samples: list[dict] = field(default_factory=list)
    """The last sample answers."""
    model: Any = None
    """The trained model in memory (PEFT-wrapped for LoRA/QLoRA), for notebooks and tests."""
    tokenizer: Any = None


# --- before anything heavy ----------------------------------------------------------------------------------------

def check_settings(cfg: Config) -> None:
    """Every one-line rejection that needs no model: combinations, files, template names, optional packages."""
    check_combination(cfg)
    check_micro_batch(cfg)
    if not cfg.data.train:
        raise UserError("data.train is empty: give one or more dataset files (data.train=data/train.jsonl)")
    for path in cfg.data.train:
        if not pair_source(path).exists():
            raise UserError(f"data.train: file not found: {path} (paths are relative to {Path.cwd()})")
    if isinstance(cfg.data.eval, str) and cfg.data.eval and not Path(cfg.data.eval).exists():
        raise UserError(f"data.eval: file not found: {cfg.data.eval}; give a file or a fraction like 0.05")
    template = cfg.model.template
    if template != "auto":
        if template.endswith(".jinja"):
            if not Path(template).is_file():
                raise UserError(f"model.template: chat template file not found: {template}"
                                + ("; eval.prompts need a template" if cfg.eval.prompts else ""))
        else:
            shipped(template)
    if cfg.model.quantization != "none":
        require("bitsandbytes", "qlora", f"model.quantization={cfg.model.quantization}")
    check_optimizer(cfg.train.optimizer)
    check_trackers(cfg.log.to)


RUN_LOGS = ("metrics_path", "samples_path", "loss_plot_path", "replay_path")
"""Written from the first step on; left alone, they do not make a folder 'hold a run'."""
RUN_WEIGHTS = ("checkpoints_dir", "adapter_dir", "full_model_dir", "tensorboard_dir")


def start_fresh(run: RunFolder, resume: str | None, overwrite: bool) -> None:
    """Clear a run folder for a new run; refuse to clobber an earlier run unless asked to."""
    weights = [getattr(run, name) for name in RUN_WEIGHTS]
    if resume is None and not overwrite and any(p.exists() for p in weights):
        raise UserError(f"{run.root} already holds a run; continue it with --resume auto, or train into another "
                        f"folder (output.dir=runs/other), or delete {run.root}")
    outputs = [getattr(run, name) for name in RUN_LOGS] + weights
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    run.root.mkdir(parents=True, exist_ok=True)


# --- the pieces of one step ---------------------------------------------------------------------------------------

def _to(batch: dict, device: Any) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def reset_peak_memory(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def make_batch(rows: Sequence[dict], pad_id: int, plan: DevicePlan) -> dict:
    return collate_flat(rows) if plan.flat_batches else collate(rows, pad_id)


def _activation_place(plan: DevicePlan) -> AbstractContextManager:
    """Checkpointed layer inputs go to pinned CPU memory when the plan says so."""
    import torch

    return torch.autograd.graph.save_on_cpu(pin_memory=True) if plan.offload else nullcontext()


def _micro_loss(state: RunState, batch: dict) -> tuple[Any, Any]:
    """(summed loss of one micro-batch, summed pair metrics or None): over supervised tokens, or over pairs."""
    if state.preference:
        return pair_loss_sum(state, batch)
    return causal_lm_loss_sum(state.model, batch, state.plan.loss), None


def train_step(state: RunState, window: list[list[int]]) -> tuple[float, float, int]:
    """One optimizer step over a window of micro-batches (row indices); returns (window loss, grad norm, tokens).
    A preference step also leaves its rewards and reward accuracy in `state.pair_metrics`."""
    import torch

    model, accelerator, plan = state.model, state.accelerator, state.plan
    rows = state.data.train
    micro_rows = [[rows[i] for i in indices] for indices in window]
    if state.preference:
        batches = [make_pair_batch(state, indices) for indices in window]
        units = sum(pair_count(b) for b in batches)
    else:
        batches = [make_batch(chosen, state.pad_id, plan) for chosen in micro_rows]
        units = sum(target_count(b) for b in batches)
    local = torch.tensor([units, sum(token_count(r) for r in micro_rows)], device=accelerator.device)
    targets, tokens = (int(v) for v in accelerator.reduce(local, "sum"))
    # DDP averages gradients over processes, so each one scales its sum by world size / global targets
    scale = accelerator.num_processes / max(targets, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    pair_sums = torch.zeros(4, device=accelerator.device)
    for i, batch in enumerate(batches):
        with gradient_sync(accelerator, model, plan, sync=i == len(batches) - 1):
            with _activation_place(plan), accelerator.autocast():
                micro, metric_sums = _micro_loss(state, _to(batch, accelerator.device))
            accelerator.backward(micro * scale)
        loss_sum += micro.detach()
        if metric_sums is not None:
            pair_sums += metric_sums
    if state.preference:
        state.pair_metrics = metric_means(accelerator.reduce(pair_sums, "sum"), targets)
    assert model.training, "training step in eval mode: checkpointing and dropout would be off"
    grad_norm = clip_gradients(accelerator, model, state.cfg.train.max_grad_norm)
    loss = float(accelerator.reduce(loss_sum, "sum")) / max(targets, 1)
    if not math.isfinite(loss) or not (math.isfinite(grad_norm) or accelerator.scaler is not None):
        state.optimizer.zero_grad(set_to_none=True)  # never apply it: the weights stay those of the last step
        raise NonFiniteLoss(loss, grad_norm)
    state.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped it, keep the schedule
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, tokens


class NonFiniteLoss(Exception):
    """A step whose loss (or, without fp16 loss scaling, gradient norm) is NaN or infinite; it was not applied."""

    def __init__(self, loss: float, grad_norm: float) -> None:
        super().__init__(f"loss {loss}, grad norm {grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


def _last_good(state: RunState) -> str:
    latest = state.run.latest_checkpoint()
    return f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"


def non_finite_error(state: RunState, step: int, exc: NonFiniteLoss) -> UserError:
    """One line: which step, what was not finite, what was kept and what to change."""
    what = f"the loss is {exc.loss}" if not math.isfinite(exc.loss) else f"the gradient norm is {exc.grad_norm}"
    return UserError(f"step {step}: {what}; training stopped before applying that step and {_last_good(state)}. "
                     f"Lower train.lr (now {state.cfg.train.lr:g}) or check the data (lowtune data preview), then "
                     f"continue with `lowtune train {state.run.config_path} --resume auto`")


def out_of_memory_error(state: RunState, step: int, exc: BaseException) -> UserError:
    """One line: the plan that ran, the measured peak, what to change and how to check it before the next try."""
    peak = peak_memory_gb(state.accelerator.device)
    plan = state.plan.describe().splitlines()[0].removeprefix("device plan: ")
    return UserError(f"out of memory at step {step} ({type(exc).__name__}) with plan {plan}; measured peak "
                     f"{peak:.2f} GiB; {fit_hint(state.cfg)}; `lowtune estimate {state.run.config_path}` shows what "
                     f"fits this GPU; {_last_good(state)} (continue with --resume auto)")


def eval_loss(state: RunState) -> float:
    """Token-mean loss over the eval samples (each process takes a share), in eval mode; train mode after."""
    import torch

    model, accelerator, samples = state.model, state.accelerator, state.data.eval
    batch_size = state.cfg.train.batch_size
    model.eval()
    local = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    stride = batch_size * accelerator.num_processes
    with torch.no_grad():
        # every process runs the same number of forwards (sharded layers gather collectively); a process whose
        # share has run out repeats the first batch and does not count it
        for start in range(0, len(samples), stride):
            mine = samples[start + accelerator.process_index * batch_size:][:batch_size]
            batch = make_batch(mine or samples[:batch_size], state.pad_id, state.plan)
            with accelerator.autocast():
                loss = float(causal_lm_loss_sum(model, _to(batch, accelerator.device), state.plan.loss))
            if mine:
                local[0] += loss
                local[1] += target_count(batch)
    model.train()
    total, count = accelerator.reduce(local, "sum").tolist()
    return total / max(count, 1)


class StopRequest:
    """Ctrl-C asks the loop to finish the current step and save a checkpoint; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True when any process was asked to stop: all of them checkpoint the same step and leave together."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([int(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item())

    def _handle(self, signum: int, frame: Any) -> None:
        # a repeat within a second is the same request (under torchrun it arrives from the terminal and the agent)
        if self.requested and time.monotonic() - self._first > 1.0:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, time.monotonic()


# --- setup --------------------------------------------------------------------------------------------------------

def make_accelerator(cfg: Config) -> Accelerator:
    """fp32 on CPU; bf16 autocast where the GPU has it, else fp16 with loss scaling (model.dtype overrides)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = default_device()
    dtype = compute_dtype(cfg.model.dtype, device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}[dtype]
    # accelerate keeps one precision per process; a later train() in the same process (a notebook) may want another
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed, cpu=device == "cpu")


def build_model(cfg: Config, model_dir: Path, accelerator: Accelerator, plan: DevicePlan) -> Any:
    """Base model (4/8-bit for QLoRA) + LoRA, or all weights trainable in fp32 (full FT; autocast computes);
    fused kernels and compiled layers where the device plan says so."""
    dtype = cfg.model.dtype if cfg.lora.enabled else "fp32"
    model = load_model(model_dir, cfg.model.quantization, cfg.model.double_quant, dtype, str(accelerator.device),
                       cfg.model.trust_remote_code, attn_implementation=plan.attention)
    if not plan.compile:  # compiled layers fuse norms, SwiGLU and RoPE themselves; Liger's calls split the graphs
        enable_fast_path(model)
    model = apply_lora(model, cfg.lora, plan.checkpointing)
    tile_mlps(model, plan.mlp_tiles)
    if plan.compile:
        compile_layers(model)
    return model


def _build_training(state: RunState, model_dir: Path) -> tuple[tuple[int, int], list[str]]:
    """Model (placed: sharded or prepared by accelerate), optimizer and schedule, into `state`. Returns
    (trainable, total) parameter counts and notes for the plan line."""
    cfg, accelerator = state.cfg, state.accelerator
    model = build_model(cfg, model_dir, accelerator, state.plan)
    state.plan = state.plan.for_model(model)
    reset_peak_memory(accelerator.device)  # the peak we report is training's, not quantisation's while loading
    counts = count_parameters(model)
    notes = []
    host_bytes = keep_input_embeddings_on_host(model) if state.plan.offload else 0
    if host_bytes:
        notes.append(f"input embeddings in host memory ({host_bytes / 2**20:.0f} MiB of GPU memory freed)")
    model = shard(model, state.plan)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train, state.plan.optimizer)
    state.scheduler = build_scheduler(optimizer, cfg.train, state.total)
    state.model, state.optimizer = prepare(accelerator, model, optimizer, state.plan)
    install_weight_hooks(accelerator)  # the schedule goes into trainer_state.json (checkpoint.py)
    return counts, notes


def _plans(cfg: Config, model_dir: Path, data: TrainData,
           accelerator: Accelerator | None) -> tuple[DevicePlan, StepPlan]:
    """How this device runs a step (every `auto` decided once) and which rows each step takes on this process;
    without an accelerator (--dry-run), this machine's default device as the only process."""
    seq_len = cfg.data.max_length or max((len(row["input_ids"]) for row in data.train), default=1)
    if cfg.train.method != "sft" and cfg.data.max_length:
        seq_len *= 2  # a row holds both sides of its pairs
    device, processes, rank = (accelerator.device, accelerator.num_processes, accelerator.process_index) \
        if accelerator else (default_device(), 1, 0)
    plan = plan_device(cfg, model_dir, device, seq_len, processes)
    return plan, StepPlan(len(data.train), plan.micro_batch, plan.grad_accum, cfg.train.seed, processes, rank)


def _build_data(cfg: Config, tokenizer: Any, template: ChatTemplate, replay: list[list[dict]] | None) -> TrainData:
    """Conversations for SFT; preference pairs for dpo/orpo/simpo."""
    if cfg.train.method != "sft":
        return build_pair_dataset(cfg, tokenizer, template)
    return build_dataset(cfg, tokenizer, template, replay)


def _describe_plan(plan: StepPlan, total: int, cfg: Config, trainable: int, params: int) -> str:
    share = 100 * trainable / max(params, 1)
    method = "full fine-tuning" if not cfg.lora.enabled else \
        ("QLoRA" if cfg.model.quantization != "none" else "LoRA") + f" r={cfg.lora.r}"
    if cfg.train.method != "sft":
        method += f", {PreferenceSettings.from_train(cfg.train).describe()}"
    return (f"plan: {method}, {trainable:,} trainable of {params:,} parameters ({share:.2f}%)\n"
            f"      {plan.num_rows} rows, {plan.batch_size * plan.grad_accum} rows per step x "
            f"{plan.world_size} process(es) -> {plan.steps_per_epoch} steps/epoch, {total} steps")


# --- the run ------------------------------------------------------------------------------------------------------

def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _dry_run(console: Console, cfg: Config, model_dir: Path, tokenizer: Any, template: ChatTemplate,
             run: RunFolder) -> TrainResult:
    """What would train, without loading weights (parameter counts come from a meta-device copy)."""
    say = lambda text: _say(console, text)  # noqa: E731
    replay_file = cache_path(cfg, model_dir, template) if replay_applies(cfg, say) else None
    replay = read_answers(replay_file) if replay_file and replay_file.is_file() else None
    if replay_file and replay is None:
        say("replay: the base model's answers are generated when training starts (not counted here)")
    data = _build_data(cfg, tokenizer, template, replay)
    device_plan, plan = _plans(cfg, model_dir, data, None)
    total = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    trainable, params = count_parameters_without_weights(model_dir, cfg.lora, cfg.model.trust_remote_code)
    cfg.versions = library_versions()
    _say(console, dump_config(cfg))
    _say(console, data.describe())
    _say(console, f"template: {template.name}, stop ids {template.stop_token_ids(tokenizer)}")
    _say(console, _describe_plan(plan, total, cfg, trainable, params))
    _say(console, device_plan.describe())
    return TrainResult(run.root, 0, trainable=trainable, total=params)


def _restore(state: RunState, checkpoint: Path, console: Console) -> int:
    """Load a checkpoint; cut metrics/samples back to its step so the record stays continuous. Returns the step."""
    saved = load_checkpoint(state, checkpoint)
    step, plan, run = int(saved["step"]), state.steps, state.run
    if state.main:
        truncate_jsonl(run.metrics_path, step)
        truncate_jsonl(run.samples_path, step)
        _say(console, f"resumed from {checkpoint} at step {step}")
        saved_rows = saved.get("rows_per_step", (saved.get("batch_size") or 0) * (saved.get("grad_accum") or 0))
        same = (saved.get("rows"), saved_rows, saved.get("processes"), saved.get("seed")) == (
            plan.num_rows, plan.batch_size * plan.grad_accum, plan.world_size, plan.seed)
        if not same:
            _say(console, "note: data, batch, accumulation, process count or seed changed since that checkpoint; "
                          "the data order from here differs from an uninterrupted run")
        if step >= state.total:
            _say(console, f"note: {checkpoint} is at step {step} and this config trains {state.total} steps: "
                          "nothing left to train (raise train.max_steps or train.epochs to go on)")
    return step


def train(cfg: Config, resume: str | None = None, dry_run: bool = False, console: Console | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train as the config says and write the run folder; `resume` = 'auto' or a checkpoint / run folder path."""
    from accelerate.utils import set_seed
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    console = console or Console(highlight=False)
    check_settings(cfg)
    run = RunFolder(Path(cfg.output.dir))
    checkpoint = find_resume(run, resume)
    hf_logging.disable_progress_bar()  # our own bar is the one to watch (also over building builtin models)
    model_dir = resolve_model_dir(cfg.model.path, cfg.model.hub, cfg.model.revision, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    template = resolve_template(cfg.model.template, tokenizer, model_dir)
    if dry_run:
        return _dry_run(console, cfg, model_dir, tokenizer, template, run)

    accelerator = make_accelerator(cfg)
    try:
        main = accelerator.is_main_process
        replay = None
        say = (lambda text: _say(console, text)) if main else (lambda text: None)
        if replay_applies(cfg, say):
            with accelerator.main_process_first():  # the first process generates, the others read its cache
                replay = base_answers(cfg, model_dir, tokenizer, template, str(accelerator.device), say)
        data = _build_data(cfg, tokenizer, template, replay)
        state = RunState(cfg, run, accelerator, *_plans(cfg, model_dir, data, accelerator), data, tokenizer,
                         template)
        if main:
            if checkpoint is None:
                start_fresh(run, resume, overwrite)
            else:
                _note_changed_settings(run, cfg, console)
            write_run_header(run, cfg, model_dir, tokenizer, template)
            if replay:
                atomic_write_text(run.replay_path, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n"
                                                           for m in replay))
        accelerator.wait_for_everyone()

        set_seed(cfg.train.seed)
        (trainable, params), notes = _build_training(state, model_dir)
        if state.preference:
            precompute_reference(state)  # full fine-tuning's DPO reference, from the base weights: before _restore
        step = _restore(state, checkpoint, console) if checkpoint is not None else 0
        if main:
            _say(console, data.describe())
            _say(console, _describe_plan(state.steps, state.total, cfg, trainable, params))
            _say(console, state.plan.describe())
            for note in notes:
                _say(console, f"      {note}")
        result = TrainResult(run.root, step, trainable=trainable, total=params,
                             model=accelerator.unwrap_model(state.model), tokenizer=tokenizer)
        recorder = Recorder(run, cfg, console, enabled=main)
        try:
            _fit_or_explain(state, result, recorder, console)
        finally:
            recorder.close()
        _export(state, console)
        return result
    finally:
        # a process group left to the interpreter's exit can abort a finished worker (gloo threads: SIGABRT)
        accelerator.end_training()


def _note_changed_settings(run: RunFolder, cfg: Config, console: Console) -> None:
    """Resuming with another config (a recipe name without the first run's overrides) is allowed, but said."""
    if not run.config_path.is_file():
        return
    changes = config_changes(run.load_config(), cfg)
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        _say(console, f"note: resuming with settings that differ from {run.config_path}: {shown}. To continue with "
                      f"the run's own settings: lowtune train {run.config_path} --resume auto")


def _fit_or_explain(state: RunState, result: TrainResult, recorder: Recorder, console: Console) -> None:
    """`_fit`, with a NaN/inf step and running out of memory turned into one line that says what to change."""
    import torch

    try:
        _fit(state, result, recorder, console)
    except NonFiniteLoss as exc:
        raise non_finite_error(state, result.steps + 1, exc) from None
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise out_of_memory_error(state, result.steps + 1, exc) from None


def _fit(state: RunState, result: TrainResult, recorder: Recorder, console: Console) -> None:
    """The step loop from result.steps: eval + samples at step 0, every eval.every and at the end; checkpoints every
    save_every. Each step's loss goes into `result`."""
    cfg, main, step, total = state.cfg, state.main, result.steps, state.total
    meter = Throughput(first_step=step, total_steps=total)

    # a live bar only on a terminal; logs (CI, nohup) get the plain step lines alone
    with ProgressBar(console, total, step, enabled=main and console.is_terminal) as bar, StopRequest() as stop:
        def observe(at: int) -> None:
            if state.data.eval and state.preference:
                scores = eval_pairs(state)
                recorder.log({"step": at, **scores})
                if main:
                    bar.print(f"step {at}: eval loss {scores['eval_loss']:.4f}, reward accuracy "
                              f"{scores['eval_rewards/accuracy']:.1%}, margin {scores['eval_rewards/margin']:.4f}")
            elif state.data.eval:
                loss = eval_loss(state)
                recorder.log({"step": at, "eval_loss": round(loss, 6)})
                if main:
                    bar.print(f"step {at}: eval loss {loss:.4f}")
            if answers_here(state.accelerator, state.plan):
                samples = write_samples(state.accelerator.unwrap_model(state.model), state.tokenizer, state.template,
                                        cfg.eval, at, state.run, bar.print, enabled=main)
                if main:
                    result.samples = samples

        if step == 0:
            observe(0)
        while step < total:
            started = time.perf_counter()
            loss, grad_norm, tokens = train_step(state, state.steps.window(step + 1))
            step_s = time.perf_counter() - started  # train_step returns Python floats: the device has finished
            step += 1
            result.steps = step
            result.losses.append(loss)
            meter.update(tokens, step_s)
            tokens_per_s, eta = meter.rates(step)
            row = {"step": step, "epoch": round(state.steps.epoch_of(step), 4), "loss": round(loss, 6),
                   **state.pair_metrics, "lr": state.scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 4), "tokens": tokens,
                   "peak_mem_gb": round(peak_memory_gb(state.accelerator.device), 3),
                   "eta": format_eta(eta)}
            recorder.log(row)
            if main:
                bar.update(step, row)
                if step % cfg.train.log_every == 0 or step in (1, total):
                    bar.print(f"step {step}/{total}  loss {loss:.4f}{_pair_line(state.pair_metrics)}"
                              f"  lr {row['lr']:.2e}  grad_norm {grad_norm:.3f}  {tokens_per_s:.0f} tok/s"
                              f"  mem {row['peak_mem_gb']:.2f} GiB  eta {row['eta']}")
            if step % cfg.eval.every == 0 or step == total:
                observe(step)
            stopping = stop.agreed(state.accelerator)
            if step % cfg.train.save_every == 0 or step == total or stopping:
                path = save_checkpoint(state, step)
                if main and step != total:
                    bar.print(f"saved {path}")
            if stopping:
                if main:
                    bar.print(f"interrupted at step {step}: saved {state.run.checkpoint_dir(step)}; continue with "
                              f"`lowtune train {state.run.config_path} --resume auto`")
                raise KeyboardInterrupt


def _pair_line(metrics: dict[str, float]) -> str:
    """'  acc 75.0%  margin 0.1234' for a preference step's progress line; '' for SFT."""
    if not metrics:
        return ""
    return f"  acc {metrics['rewards/accuracy']:.1%}  margin {metrics['rewards/margin']:.4f}"


def _export(state: RunState, console: Console) -> None:
    """adapter/ or model/ and loss.png into the run folder (rank 0; the weights of a sharded model are gathered by
    every process first)."""
    weights = gathered_weights(state.model, state.plan)
    if state.main:
        export_weights(state.accelerator.unwrap_model(state.model), state.tokenizer, state.template, state.run,
                       state.cfg, weights)
        plot_loss(state.run.root)
        _say(console, f"done: {state.run.root} (continue with: lowtune chat {state.run.root})")
    state.accelerator.wait_for_everyone()

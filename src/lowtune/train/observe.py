"""What a training run shows and records: progress bar, log lines, metrics.jsonl (+ TensorBoard / wandb / swanlab),
sample answers to the eval prompts (samples.jsonl).

Layer 2 (train). Trackers are optional: TensorBoard is skipped with a note when not installed (it is the default),
wandb / swanlab must be installed when asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.config import Config, EvalSection
from lowtune.errors import require
from lowtune.generation import Sampling, answer
from lowtune.runs import RunFolder, atomic_write_text

if TYPE_CHECKING:
    from rich.console import Console

    from lowtune.templates import ChatTemplate

def peak_memory_gb(device: Any) -> float:
    """Peak accelerator memory allocated by this process (GiB); on CPU the peak resident set size."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (killed mid-append) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop rows logged after `last_step` (work lost since the checkpoint we resume from): a continuous record."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def check_trackers(log_to: list[str]) -> None:
    """Fail before loading anything when an explicitly requested tracker is missing."""
    for name in log_to:
        if name in ("wandb", "swanlab"):
            require(name, name, f"log.to={name}")


class Recorder:
    """metrics.jsonl plus the optional trackers; one `log(row)` call per event (main process only)."""

    def __init__(self, run: RunFolder, cfg: Config, console: Console, enabled: bool = True) -> None:
        self.run, self.enabled, self.trackers = run, enabled, []
        if not enabled:
            return
        for name in cfg.log.to:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    console.print("note: tensorboard is not installed, skipping it "
                                  "(pip install 'lowtune[tensorboard]')", markup=False)
                    continue
                self.trackers.append(("tensorboard", SummaryWriter(str(run.tensorboard_dir))))
            elif name == "wandb":
                import wandb

                self.trackers.append(("wandb", wandb.init(project="lowtune", name=run.root.name,
                                                          config=cfg.model_dump(mode="json"))))
            elif name == "swanlab":
                import swanlab

                self.trackers.append(("swanlab", swanlab.init(project="lowtune", experiment_name=run.root.name,
                                                              config=cfg.model_dump(mode="json"))))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run.metrics_path, row)
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for name, tracker in self.trackers:
            if name == "tensorboard":
                for key, value in scalars.items():
                    tracker.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", value, step)
                tracker.flush()
            else:
                tracker.log(scalars, step=step)

    def close(self) -> None:
        for name, tracker in self.trackers:
            if name == "tensorboard":
                tracker.close()
            else:
                tracker.finish()


@dataclass
class Throughput:
    """Tokens/s and ETA from the time spent in training steps (eval and sample answers are not counted in the
    speed, which is what the hardware does; a resumed run starts counting afresh)."""

    first_step: int
    total_steps: int
    tokens: int = 0
    busy: float = 0.0

    def update(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.busy += seconds

    def rates(self, step: int) -> tuple[float, float]:
        busy = max(self.busy, 1e-9)
        done = step - self.first_step
        eta = busy / done * (self.total_steps - step) if done > 0 else float("inf")
        return self.tokens / busy, eta


class ProgressBar:
    """A rich progress bar (loss, lr, tokens/s, ETA, peak memory) with log lines printed above it."""

    def __init__(self, console: Console, total: int, start: int, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, disable=not enabled,
                                 transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, row: dict) -> None:
        info = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s  "
                f"eta {row['eta']}  mem {row['peak_mem_gb']:.2f} GiB")
        self.progress.update(self.task, completed=step, info=info)

    def print(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)


def sample_messages(eval_cfg: EvalSection, prompt: str) -> list[dict]:
    system = [{"role": "system", "content": eval_cfg.system}] if eval_cfg.system else []
    return [*system, {"role": "user", "content": prompt}]


def write_samples(model: Any, tokenizer: Any, template: ChatTemplate, eval_cfg: EvalSection, step: int,
                  run: RunFolder, show: Any, enabled: bool = True) -> list[dict]:
    """Greedy answers to every eval prompt: printed and appended to samples.jsonl (step 0 = before training)."""
    rows = []
    for prompt in eval_cfg.prompts:
        text = answer(model, tokenizer, template, sample_messages(eval_cfg, prompt),
                      Sampling(max_new_tokens=eval_cfg.max_new_tokens))
        rows.append({"step": step, "system": eval_cfg.system, "prompt": prompt, "answer": text})
    if enabled and rows:
        show(f"samples at step {step}:")
        for row in rows:
            show(f"  Q: {row['prompt']}\n  A: {row['answer']}")
            append_jsonl(run.samples_path, row)
    return rows

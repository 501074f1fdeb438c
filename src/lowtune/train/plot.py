"""loss.png from metrics.jsonl: training loss per step, eval loss as points (matplotlib, no display needed).

Layer 2 (train). `lowtune plot RUN` calls `plot_loss` on any run folder, finished or not.
"""

from __future__ import annotations

from pathlib import Path

from lowtune.errors import UserError
from lowtune.runs import RunFolder, atomic_file, is_run_folder
from lowtune.train.observe import read_jsonl


def plot_loss(run_dir: str | Path) -> Path:
    """Draw the run's loss curve into loss.png (replaced atomically) and return its path."""
    run = RunFolder(Path(run_dir))
    if not is_run_folder(run.root):
        raise UserError(f"{run.root} is not a run folder (no config.yaml); give the folder train wrote, e.g. runs/NAME")
    rows = read_jsonl(run.metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        raise UserError(f"{run.metrics_path}: no loss recorded yet; train first (lowtune train CONFIG)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.set_title(run.root.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(run.loss_plot_path, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return run.loss_plot_path

"""`lowtune demo`: the whole flow on CPU with nothing to download.

Top layer (beside cli). Builds builtin:tiny, writes identity data for a name, trains the shipped `tiny-self`
recipe, then shows the answers to the eval prompts before (step 0) and after training, and the commands to go on.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lowtune.config import load_config
from lowtune.data.identity import identity_conversations
from lowtune.errors import UserError
from lowtune.models.builtin import builtin_path
from lowtune.runs import RunFolder, atomic_write_text
from lowtune.train import train
from lowtune.train.observe import read_jsonl

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_NAME = "小明"
RECIPE = "tiny-self"
IDENTITY_REPEAT = 4
"""Each identity question appears this many times (zh + en): enough for builtin:tiny to learn the name."""
RANDOM_MODEL_SETTINGS = ["data.replay=0", "train.lr=3e-3", "data.max_length=256",
                         'eval.prompts=["你是谁", "Who are you?"]']
"""builtin:tiny has random weights: it knows nothing to keep (no replay), so only the identity prompts are shown,
and it learns only at a high learning rate. The recipe's own settings are for real models."""


def write_identity_data(name: str, path: Path) -> int:
    """Identity conversations (Chinese and English questions) as canonical JSONL; returns the count."""
    conversations = identity_conversations(name, lang="both", repeat=IDENTITY_REPEAT, seed=0)
    lines = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations)
    atomic_write_text(path, lines)
    return len(conversations)


def _check_output(run: RunFolder) -> None:
    """The demo replaces its own earlier run, never somebody's real one."""
    if run.config_path.is_file() and run.load_config().model.path != "builtin:tiny":
        raise UserError(f"{run.root} holds a run that is not a demo; pick another folder with -o")


def _answers_by_step(run: RunFolder) -> tuple[dict[str, str], dict[str, str]]:
    rows = read_jsonl(run.samples_path)
    last = max((r["step"] for r in rows), default=0)
    before = {r["prompt"]: r["answer"] for r in rows if r["step"] == 0}
    after = {r["prompt"]: r["answer"] for r in rows if r["step"] == last}
    return before, after


def show_comparison(console: Console, run: RunFolder, name: str) -> bool:
    """A before/after table; True when every trained answer names the model."""
    from rich.table import Table

    before, after = _answers_by_step(run)
    table = Table(title="before and after training (greedy)", show_lines=True)
    for column in ("prompt", "untrained", "trained"):
        table.add_column(column, overflow="fold")
    for prompt, answer in after.items():
        table.add_row(prompt, before.get(prompt, ""), answer)
    console.print(table)
    return bool(after) and all(name in answer for answer in after.values())


def run_demo(name: str | None = None, output: str = "runs/demo", console: Console | None = None) -> int:
    """Build, train and compare; returns the CLI exit code (0 also when the answers miss the name: it says so)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    name = (name or DEFAULT_NAME).strip()
    run = RunFolder(Path(output))
    _check_output(run)
    started = time.perf_counter()
    console.print("1/3 building the built-in tiny model (a real Llama-architecture model, CPU) ...", markup=False)
    builtin_path("builtin:tiny")
    data_path = run.root.parent / f"{run.root.name}-identity.jsonl"
    count = write_identity_data(name, data_path)
    console.print(f"2/3 wrote {count} identity conversations for '{name}' to {data_path}", markup=False)
    cfg = load_config(RECIPE, [*RANDOM_MODEL_SETTINGS, "train.epochs=6", f"data.train={data_path}",
                               f"output.dir={run.root}"])
    console.print(f"3/3 training recipe {RECIPE} (LoRA on CPU) ...", markup=False)
    train(cfg, console=console, overwrite=True)
    learned = show_comparison(console, run, name)
    seconds = time.perf_counter() - started
    verdict = f"the tuned model now answers as {name}" if learned else \
        f"the tuned model does not say '{name}' in every answer yet; train longer: lowtune train {RECIPE} " \
        f"{' '.join(shlex.quote(s) for s in RANDOM_MODEL_SETTINGS)} train.epochs=10 data.train={data_path} output.dir={run.root}"
    console.print(f"{verdict} ({seconds:.0f} s in all)", markup=False)
    console.print("\nnext:", markup=False)
    for command in (f'lowtune chat {run.root} --prompt "你是谁"', f"lowtune chat {run.root} --compare",
                    f"lowtune plot {run.root}", f"lowtune merge {run.root} -o merged/{run.root.name}",
                    f"lowtune copy {RECIPE} my-self.yaml   # then edit it and: lowtune train my-self.yaml"):
        console.print(f"  {command}", markup=False, soft_wrap=True)
    return 0

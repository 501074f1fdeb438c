"""`lowtune eval`: loss and perplexity of a test split, and sample answers next to the references.

The test conversations are read and encoded exactly as training reads its data (same converters, default system
prompt, template label masks, max_length), so the loss is comparable with the training curve: the sum of the
per-token cross-entropy over every trained (answer + end-of-turn) token, divided by their count. When the model has
an adapter, the base model's loss on the same tokens is measured too (adapter disabled, same weights).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lowtune.data.dataset import encode_all, iter_sources
from lowtune.data.encode import IGNORE_INDEX
from lowtune.data.formats import ReadReport
from lowtune.errors import UserError
from lowtune.generation import Sampling
from lowtune.infer.engine import ChatEngine
from lowtune.runs import RunFolder, atomic_write_text, close_name_hint, is_run_folder, missing_folder

TOKENS_PER_BATCH = 4096
"""Padded tokens per forward pass: bounds the fp32 logits (tokens × vocab) kept for the loss."""
WORDS = re.compile(r"[\u4e00-\u9fff]|[A-Za-z0-9]+")


@dataclass
class Sample:
    question: str
    reference: str
    answer: str


@dataclass
class EvalReport:
    data: str
    conversations: int
    tokens: int
    """Trained tokens the loss is averaged over."""
    loss: float
    perplexity: float
    base_loss: float | None = None
    base_perplexity: float | None = None
    samples: list[Sample] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n"


# --- loss ---------------------------------------------------------------------------------------------------------

def _batches(rows: list[dict], budget: int = TOKENS_PER_BATCH) -> list[list[dict]]:
    """Rows grouped by similar length so that padded size stays under `budget` (at least one row each)."""
    batches: list[list[dict]] = []
    current: list[dict] = []
    for row in sorted(rows, key=lambda r: len(r["input_ids"])):
        width = len(row["input_ids"])
        if current and width * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def loss_sum(model: Any, rows: list[dict], pad_id: int, budget: int = TOKENS_PER_BATCH) -> tuple[float, int]:
    """(sum of per-token cross-entropy, number of trained tokens) over `rows`, padded batches of `budget` tokens."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches(rows, budget):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch], device=device)
        labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in batch],
                              device=device)
        mask = (torch.arange(width, device=device)[None, :] <
                torch.tensor([len(r["input_ids"]) for r in batch], device=device)[:, None]).long()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
    return total, count


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# --- samples and metrics ------------------------------------------------------------------------------------------

def sample_answers(engine: ChatEngine, conversations: list[list[dict]], n: int, sampling: Sampling) -> list[Sample]:
    """Answers to the first `n` conversations that end with an assistant message, next to that message."""
    samples = []
    for messages in conversations:
        if len(samples) >= n:
            break
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last < 1 or messages[last - 1]["role"] != "user":
            continue
        prompt = messages[:last]
        samples.append(Sample(question=prompt[-1]["content"], reference=messages[last]["content"],
                              answer=engine.answer(prompt, sampling)))
    return samples


def text_metrics(samples: list[Sample]) -> dict[str, Any]:
    """Exact match always; ROUGE-L F1 through the `rouge_score` package when it is installed."""
    if not samples:
        return {}
    norm = [(" ".join(s.answer.split()), " ".join(s.reference.split())) for s in samples]
    metrics: dict[str, Any] = {"exact_match": sum(a == r for a, r in norm) / len(norm)}
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        metrics["rouge_l"] = "skipped: pip install 'lowtune[eval]' (rouge-score) to compute it"
        return metrics

    class Words:  # Chinese by character, other scripts by word (rouge_score's default drops CJK)
        def tokenize(self, text: str) -> list[str]:
            return [w.lower() for w in WORDS.findall(text)]

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words())
    scores = [scorer.score(s.reference, s.answer)["rougeL"].fmeasure for s in samples]
    metrics["rouge_l"] = sum(scores) / len(scores)
    return metrics


# --- the command --------------------------------------------------------------------------------------------------

def evaluate(engine: ChatEngine, data: str, n_samples: int = 5, sampling: Sampling | None = None,
             max_length: int | None = None, with_base: bool = True) -> EvalReport:
    """Loss/perplexity of every conversation in `data` and `n_samples` answers beside their references."""
    started = time.perf_counter()
    if not Path(data).exists():
        raise UserError(f"--data {data}: file not found")
    config = engine.config
    fmt = config.data.format if config else "auto"
    max_length = max_length or (config.data.max_length if config else None)
    system = engine.default_system
    report = ReadReport()
    conversations = list(iter_sources([data], fmt, system, report))
    rows = encode_all(conversations, engine.tokenizer, engine.template, max_length)
    if not rows:
        raise UserError(f"--data {data}: no conversation with an assistant answer to score"
                        + (f" ({report.describe()})" if report.skipped else ""))
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else engine.all_stop_ids()[0]
    total, count = loss_sum(engine.model, rows, pad_id)
    result = EvalReport(data=str(data), conversations=len(rows), tokens=count, loss=total / count,
                        perplexity=_perplexity(total / count), max_length=max_length)
    if with_base and engine.has_adapter:
        with engine.without_adapter():
            base_total, _ = loss_sum(engine.model, rows, pad_id)
        result.base_loss, result.base_perplexity = base_total / count, _perplexity(base_total / count)
    result.samples = sample_answers(engine, conversations, n_samples, sampling or Sampling(max_new_tokens=256))
    result.metrics = text_metrics(result.samples)
    result.seconds = time.perf_counter() - started
    return result


def eval_output_path(target: str, output: str | None) -> Path:
    """-o, else eval.json in the run folder; a model folder needs -o."""
    if output:
        return Path(output)
    if is_run_folder(Path(target)):
        return RunFolder(Path(target)).eval_path
    if not Path(target).exists() and close_name_hint(Path(target)):
        raise missing_folder(Path(target))
    raise UserError(f"{target} is not a run folder, so there is no place for eval.json; give -o FILE")


def write_report(report: EvalReport, path: Path) -> None:
    atomic_write_text(path, report.to_json())


def show_report(report: EvalReport, path: Path, out: TextIO | None = None, width: int = 300) -> None:
    """A summary table and the sample answers beside their references."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=out)
    summary = Table(title=f"eval of {escape(report.data)}", show_header=True)
    summary.add_column("")
    summary.add_column("fine-tuned" if report.base_loss is not None else "model", justify="right")
    if report.base_loss is not None:
        summary.add_column("base", justify="right")
    base = report.base_loss is not None
    summary.add_row("loss", f"{report.loss:.4f}", *([f"{report.base_loss:.4f}"] if base else []))
    summary.add_row("perplexity", f"{report.perplexity:.3f}", *([f"{report.base_perplexity:.3f}"] if base else []))
    summary.add_row("conversations / tokens", f"{report.conversations} / {report.tokens}", *([""] if base else []))
    for name, value in report.metrics.items():
        shown = f"{value:.3f}" if isinstance(value, float) else escape(str(value))
        summary.add_row(name, shown, *([""] if base else []))
    console.print(summary)
    if report.samples:
        table = Table(title="sample answers", show_lines=True, expand=True)
        for name in ("#", "question", "reference", "answer"):
            table.add_column(name, overflow="fold", ratio=None if name == "#" else 1)
        for i, s in enumerate(report.samples, 1):
            table.add_row(str(i), *(escape(text[:width]) for text in (s.question, s.reference, s.answer)))
        console.print(table)
    console.print(f"wrote {escape(str(path))} ({report.seconds:.1f}s)")

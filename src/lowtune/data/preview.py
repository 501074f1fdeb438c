"""`lowtune data preview`: what the model will see, with the trained spans marked, and length statistics.

Layer 1. The first N conversations are rendered through the chat template with each trained span highlighted
(colour on a terminal, ⟦ ⟧ markers otherwise); the whole source is then encoded to report token lengths and how
many samples max_length would truncate or drop.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lowtune.data.encode import IGNORE_INDEX, encode_many, has_loss, is_pretraining, truncate
from lowtune.data.formats import read_conversations
from lowtune.data.messages import ReadReport, add_system
from lowtune.data.pairs import is_pair_file, pair_conversations, read_pairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lowtune.templates import ChatTemplate

OPEN, CLOSE = "⟦", "⟧"
BATCH = 256


@dataclass
class Shown:
    where: str
    pieces: list[tuple[str, bool]]
    """(text, trained) in order."""
    tokens: int
    trained: int


@dataclass
class LengthStats:
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0

    def describe(self, max_length: int | None) -> str:
        if not self.lengths:
            return "no conversation to measure"
        ordered = sorted(self.lengths)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        lines = [f"{len(ordered)} samples, {sum(ordered)} tokens ({self.trained_tokens} trained); tokens per sample: "
                 f"min {ordered[0]}, median {int(statistics.median(ordered))}, p95 {p95}, max {ordered[-1]}"]
        if max_length:
            lines.append(f"at max_length {max_length}: {self.truncated} would be truncated, "
                         f"{self.dropped} dropped (no trained token left)")
        elif self.dropped:
            lines.append(f"{self.dropped} dropped (no trained token)")
        return "\n".join(lines)


def pieces_of(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> list:
    """(text, trained) pieces of one conversation as the template renders it."""
    if is_pretraining(messages):
        return [(messages[0]["content"], has_loss(messages[0]))]
    return [(text, index is not None and has_loss(messages[index]))
            for text, index in template.segments(messages, tokenizer)]


def collect(paths: list[str], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, count: int,
            max_length: int | None, fmt: str = "auto", system: str | None = None,
            report: ReadReport | None = None) -> tuple[list[Shown], LengthStats]:
    """The first `count` conversations to show, and length statistics over every conversation."""
    report = report if report is not None else ReadReport()
    shown: list[Shown] = []
    stats = LengthStats()
    batch: list[tuple[str, list[dict]]] = []

    def flush() -> None:
        for (where, messages), full in zip(batch, encode_many([m for _, m in batch], tokenizer, template)):
            length = len(full["input_ids"])
            stats.lengths.append(length)
            stats.trained_tokens += sum(1 for t in full["labels"] if t != IGNORE_INDEX)
            kept = truncate(full, max_length)
            stats.dropped += kept is None
            stats.truncated += kept is not None and len(kept["input_ids"]) < length
            if len(shown) < count:
                trained = sum(1 for t in full["labels"] if t != IGNORE_INDEX)
                shown.append(Shown(where, pieces_of(messages, tokenizer, template), length, trained))
        batch.clear()

    for path in paths:
        for where, messages in _readable(path, fmt, report):
            batch.append((where, add_system(messages, system)))
            if len(batch) == BATCH:
                flush()
    flush()
    return shown, stats


def _readable(path: str, fmt: str, report: ReadReport) -> Iterator[tuple[str, list[dict]]]:
    """(where, conversation) of a source; a preference pair gives its chosen side, then its rejected side."""
    if not is_pair_file(path):
        yield from read_conversations(path, fmt, report)
        return
    report.unit = "pairs"
    for where, pair in read_pairs(path, fmt, report):
        chosen, rejected = pair_conversations(pair)
        yield f"{where} chosen", chosen
        yield f"{where} rejected", rejected


def plain_text(sample: Shown) -> str:
    """The rendered sample with each trained span between ⟦ and ⟧."""
    return "".join(f"{OPEN}{text}{CLOSE}" if trained else text for text, trained in sample.pieces)


def header(sample: Shown, number: int, max_length: int | None) -> str:
    cut = f", cut to {max_length} by max_length" if max_length and sample.tokens > max_length else ""
    return f"── {number}. {sample.where} · {sample.tokens} tokens, {sample.trained} trained{cut}"


@dataclass
class PreviewPlan:
    paths: list[str]
    model: str
    template: str
    max_length: int | None
    fmt: str = "auto"
    system: str | None = None
    note: str = ""


def plan_preview(source: str, model: str | None, template: str | None, max_length: int | None) -> PreviewPlan:
    """What to preview: a data file (with builtin:tiny unless --model), or a config's data, model and template."""
    from pathlib import Path

    from lowtune.config import DataSection, load_config, recipe_names

    is_config = Path(source).suffix in (".yaml", ".yml") or (not Path(source).exists() and source in recipe_names())
    if is_config:
        cfg = load_config(source)
        return PreviewPlan(list(cfg.data.train), model or cfg.model.path, template or cfg.model.template,
                           max_length or cfg.data.max_length, cfg.data.format, cfg.data.system)
    note = "" if model else "token counts use builtin:tiny's tokenizer; pass --model for your model's"
    return PreviewPlan([source], model or "builtin:tiny", template or "auto",
                       max_length or DataSection().max_length, note=note)


def load_tokenizer_and_template(model: str, template: str) -> tuple:
    """(tokenizer, ChatTemplate) for a model spec: builtin:NAME, a local folder, or a hub id."""
    from transformers import AutoTokenizer

    from lowtune.models.resolve import resolve_model_dir
    from lowtune.templates import resolve_template

    model_dir = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, resolve_template(template, tokenizer, model_dir)

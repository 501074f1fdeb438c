"""Config -> training data: read every source, add the default system prompt, encode, hold out eval, pack.

Layer 1. `build_dataset` is what `train` calls; `TrainData.describe()` is what it prints before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lowtune.data.encode import IGNORE_INDEX, encode_full, truncate
from lowtune.data.formats import ReadReport, add_system, read_conversations
from lowtune.data.pack import pack_samples
from lowtune.data.split import split_indices
from lowtune.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lowtune.config import Config
    from lowtune.templates import ChatTemplate


@dataclass
class DataSummary:
    conversations: int = 0
    """Conversations read (after skipping unreadable records)."""
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    truncated: int = 0
    """Samples cut to max_length that kept some trained tokens."""
    dropped: int = 0
    """Samples with no trained token left (after truncation, or all answers loss: false)."""
    tokens: int = 0
    supervised_tokens: int = 0
    samples: int = 0
    rows: int = 0
    eval_samples: int = 0

    def describe(self) -> str:
        lines = [f"data: {self.conversations} conversations -> {self.samples} train samples in {self.rows} rows, "
                 f"{self.eval_samples} eval samples",
                 f"      {self.tokens} tokens, {self.supervised_tokens} trained "
                 f"({100 * self.supervised_tokens / max(self.tokens, 1):.1f}%)"]
        if self.truncated or self.dropped:
            lines.append(f"      {self.truncated} truncated to max_length, {self.dropped} dropped (no trained token)")
        if self.skipped:
            lines.append(f"      skipped {self.skipped} unreadable records, first: {'; '.join(self.skip_reasons)}")
        return "\n".join(lines)


@dataclass
class TrainData:
    train: list[dict]
    """Packed rows (input_ids, labels, position_ids, seq_lens) when data.packing, else single samples."""
    eval: list[dict]
    """Single samples (input_ids, labels), never packed."""
    summary: DataSummary

    def describe(self) -> str:
        return self.summary.describe()


def read_sources(paths: list[str], fmt: str, system: str | None, summary: DataSummary) -> list[list[dict]]:
    """Every conversation of every source, with the default system prompt added where missing."""
    report = ReadReport()
    conversations = [add_system(m, system) for path in paths for _, m in read_conversations(path, fmt, report)]
    summary.conversations += report.converted
    summary.skipped += report.skipped
    summary.skip_reasons = report.reasons
    return conversations


def encode_all(conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
               max_length: int | None, summary: DataSummary | None = None) -> list[dict]:
    """Encoded samples; conversations with nothing left to train are dropped (and counted in `summary`)."""
    samples = []
    for messages in conversations:
        full = encode_full(messages, tokenizer, template)
        sample = truncate(full, max_length)
        if summary is not None:
            summary.dropped += sample is None
            summary.truncated += sample is not None and len(sample["input_ids"]) < len(full["input_ids"])
        if sample is not None:
            samples.append(sample)
    return samples


def build_dataset(cfg: Config, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> TrainData:
    """Training (packed or not) and eval samples for a config, with counts for the user."""
    data = cfg.data
    if not data.train:
        raise UserError("data.train is empty: give one or more dataset files (data.train=data/train.jsonl)")
    summary = DataSummary()
    conversations = read_sources(data.train, data.format, data.system, summary)
    if not conversations:
        raise UserError(f"no usable conversation in {', '.join(data.train)}"
                        + (f"; first problem: {summary.skip_reasons[0]}" if summary.skip_reasons else ""))
    eval_conversations: list[list[dict]] = []
    if isinstance(data.eval, float):
        keep, held = split_indices(len(conversations), 1 - data.eval, cfg.train.seed)
        eval_conversations = [conversations[i] for i in held]
        conversations = [conversations[i] for i in keep]
    elif isinstance(data.eval, str) and data.eval:
        eval_conversations = read_sources([data.eval], data.format, data.system, DataSummary())
    samples = encode_all(conversations, tokenizer, template, data.max_length, summary)
    if not samples:
        raise UserError(f"every conversation in {', '.join(data.train)} lost all trained tokens at "
                        f"data.max_length={data.max_length}; raise data.max_length")
    eval_samples = encode_all(eval_conversations, tokenizer, template, data.max_length)
    summary.samples = len(samples)
    summary.tokens = sum(len(s["input_ids"]) for s in samples)
    summary.supervised_tokens = sum(sum(1 for t in s["labels"] if t != IGNORE_INDEX) for s in samples)
    train = pack_samples(samples, data.max_length, cfg.train.seed) if data.packing else samples
    summary.rows = len(train)
    summary.eval_samples = len(eval_samples)
    return TrainData(train=train, eval=eval_samples, summary=summary)

"""Config -> training data: read every source, add the default system prompt, encode, hold out eval, pack, cache.

Layer 1. `build_dataset` is what `train` calls; `TrainData.describe()` is what it prints before the first step.
Sources are streamed twice (count, then encode in batches straight into the tokenisation cache), so memory grows
with the number of samples (a few integers each), not with the number of tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.data import cache
from lowtune.data.encode import assemble, plan_batch, truncate
from lowtune.data.formats import missing_dataset, read_conversations
from lowtune.data.messages import ReadReport, add_system
from lowtune.data.pack import plan_rows
from lowtune.data.split import split_indices
from lowtune.errors import UserError
from lowtune.runs import staged_dir

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
    replayed: int = 0
    """Conversations of the base model's own answers (data.replay) among `conversations`."""
    cached: bool = False
    """True when this came from the tokenisation cache."""

    def describe(self) -> str:
        lines = [f"data: {self.conversations} conversations -> {self.samples} train samples in {self.rows} rows, "
                 f"{self.eval_samples} eval samples",
                 f"      {self.tokens} tokens, {self.supervised_tokens} trained "
                 f"({100 * self.supervised_tokens / max(self.tokens, 1):.1f}%)"]
        if self.replayed:
            lines.append(f"      {self.replayed} of the conversations replay the base model's own answers "
                         f"({100 * self.replayed / max(self.conversations, 1):.0f}%, data.replay)")
        if self.truncated or self.dropped:
            lines.append(f"      {self.truncated} truncated to max_length, {self.dropped} dropped (no trained token)")
        if self.skipped:
            lines.append(f"      skipped {self.skipped} unreadable records, first: {'; '.join(self.skip_reasons)}")
        if self.cached:
            lines.append("      (tokenised samples read from the cache)")
        return "\n".join(lines)


@dataclass
class TrainData:
    train: Sequence[dict]
    """Packed rows (input_ids, labels, position_ids, seq_lens) when data.packing, else single samples."""
    eval: Sequence[dict]
    """Single samples (input_ids, labels), never packed."""
    summary: DataSummary

    def describe(self) -> str:
        return self.summary.describe()


BATCH = 256  # conversations per tokenizer call


def in_batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last one shorter), without reading ahead."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_sources(paths: list[str], fmt: str, system: str | None, report: ReadReport) -> Iterator[list[dict]]:
    """Every conversation of every source, with the default system prompt added where missing."""
    for path in paths:
        for _, messages in read_conversations(path, fmt, report):
            yield add_system(messages, system)


def encode_stream(conversations: Iterator[list[dict]], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                  max_length: int | None, summary: DataSummary | None = None) -> Iterator[dict]:
    """Encoded, truncated samples; those with nothing left to train are dropped (and counted in `summary`).

    The tokenizer (native code, GIL released) works on one batch in a helper thread while this thread renders the
    next one.
    """
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in in_batches(conversations, BATCH):
            plans, texts = plan_batch(batch, tokenizer, template)
            job = (plans, pool.submit(tokenize, texts))
            if pending is not None:
                yield from _finish(pending, tokenizer, max_length, summary)
            pending = job
        if pending is not None:
            yield from _finish(pending, tokenizer, max_length, summary)


def _finish(job: tuple, tokenizer: PreTrainedTokenizerBase, max_length: int | None,
            summary: DataSummary | None) -> Iterator[dict]:
    plans, future = job
    for full in assemble(plans, future.result(), tokenizer):
        sample = truncate(full, max_length)
        if summary is not None:
            summary.dropped += sample is None
            summary.truncated += sample is not None and len(sample["input_ids"]) < len(full["input_ids"])
        if sample is not None:
            yield sample


def encode_all(conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
               max_length: int | None, summary: DataSummary | None = None) -> list[dict]:
    """Encoded samples of some conversations, in memory (preview, eval of a small file)."""
    return list(encode_stream(iter(conversations), tokenizer, template, max_length, summary))


def _key(cfg: Config, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
         replay: list[list[dict]] | None) -> str:
    data = cfg.data
    files = [*data.train, *([data.eval] if isinstance(data.eval, str) and data.eval else [])]
    for path in files:
        if not Path(path).exists():
            raise missing_dataset(Path(path))
    return cache.cache_key({
        "files": [cache.file_digest(Path(p)) for p in files], "eval": data.eval, "format": data.format,
        "system": data.system, "max_length": data.max_length, "packing": data.packing, "seed": cfg.train.seed,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer), "template": template.source,
        "replay": [data.replay, replay] if replay else None})


def build_dataset(cfg: Config, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                  replay: list[list[dict]] | None = None, cache_root: Path | None = None) -> TrainData:
    """Training (packed or not) and eval samples for a config, with counts for the user; cached on disk.

    `replay` (the base model's own answers, see train/replay.py) is repeated after the training files until it
    makes up `data.replay` of the training conversations; it is never held out for eval.
    """
    if not cfg.data.train:
        raise UserError("data.train is empty: give one or more dataset files (data.train=data/train.jsonl)")
    folder = (cache_root or cache.default_cache_root()) / _key(cfg, tokenizer, template, replay)
    if cache.is_complete(folder):
        summary = DataSummary(**json.loads((folder / "summary.json").read_text(encoding="utf-8")))
        summary.cached = True
    else:
        with staged_dir(folder, replace=False) as tmp:  # another process that finished first keeps its folder
            summary = _write_cache(tmp, cfg, tokenizer, template, replay or [])
            cache.mark_complete(tmp)
    samples = cache.SampleStore(folder, "train")
    train = cache.load_rows(folder, samples) if cfg.data.packing else samples
    return TrainData(train=train, eval=cache.SampleStore(folder, "eval"), summary=summary)


def _write_cache(folder: Path, cfg: Config, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                 replay: list[list[dict]]) -> DataSummary:
    data, summary, report = cfg.data, DataSummary(), ReadReport()
    held: set[int] = set()
    if isinstance(data.eval, float):  # a held-out fraction needs the count first: one extra, cheap reading pass
        total = sum(1 for _ in iter_sources(data.train, data.format, None, ReadReport()))
        held = set(split_indices(total, 1 - data.eval, cfg.train.seed)[1]) if total else set()
    held_out: list[list[dict]] = []  # a small fraction, kept in memory until the train part is written

    def train_part() -> Iterator[list[dict]]:
        for i, messages in enumerate(iter_sources(data.train, data.format, data.system, report)):
            if i in held:
                held_out.append(messages)
            else:
                yield messages
        if replay and report.converted:
            own = report.converted - len(held)
            summary.replayed = max(1, round(own * data.replay / (1 - data.replay)))
            yield from repeat_shuffled(replay, summary.replayed, cfg.train.seed)

    train_writer = cache.SampleWriter(folder, "train")
    for sample in encode_stream(train_part(), tokenizer, template, data.max_length, summary):
        summary.supervised_tokens += train_writer.add(sample)
        summary.tokens += len(sample["input_ids"])
    train_writer.close()
    summary.skipped, summary.skip_reasons = report.skipped, report.reasons
    summary.conversations = report.converted + summary.replayed
    if not report.converted:
        raise UserError(f"no usable conversation in {', '.join(data.train)}"
                        + (f"; first problem: {report.reasons[0]}" if report.reasons else ""))
    eval_source: Iterator[list[dict]] = iter(held_out)
    if isinstance(data.eval, str) and data.eval:
        eval_source = iter_sources([data.eval], data.format, data.system, ReadReport())
    eval_writer = cache.SampleWriter(folder, "eval")
    for sample in encode_stream(eval_source, tokenizer, template, data.max_length):
        eval_writer.add(sample)
    eval_writer.close()
    summary.samples, summary.eval_samples = len(train_writer.lengths), len(eval_writer.lengths)
    if not summary.samples:
        raise UserError(f"every conversation in {', '.join(data.train)} lost all trained tokens at "
                        f"data.max_length={data.max_length}; raise data.max_length")
    rows = plan_rows(train_writer.lengths, data.max_length, cfg.train.seed) if data.packing else []
    cache.save_rows(folder, rows)
    summary.rows = len(rows) if data.packing else summary.samples
    (folder / "summary.json").write_text(json.dumps(asdict(summary), ensure_ascii=False), encoding="utf-8")
    return summary


def repeat_shuffled(items: list, count: int, seed: int) -> list:
    """`count` items: whole shuffled passes over `items`, then a seeded part of one more."""
    rng = random.Random(seed)
    out: list = []
    while len(out) < count:
        batch = list(items)
        rng.shuffle(batch)
        out += batch[: count - len(out)]
    return out

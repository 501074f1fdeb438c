"""Preference pairs -> training data: two encoded samples per pair, rows of whole pairs, batches that say which
sequence each token belongs to.

Layer 1. A pair encodes as two samples, prompt + chosen and prompt + rejected, with the SFT label masks (only the
answer and its end-of-turn token are trained; earlier answers inside the prompt are context). Each side is cut at
data.max_length; a pair with a side left without a trained token is dropped and counted. Samples are stored in the
tokenisation cache interleaved (2k = chosen of pair k, 2k + 1 = its rejected side), and a row holds whole pairs in
that order, position ids restarting per sample, so one forward covers both sides with per-sample attention.
With data.packing, pairs are packed best-fit into rows of 2 x data.max_length tokens; without, one pair per row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowtune.data import cache
from lowtune.data.collate import collate, collate_flat
from lowtune.data.dataset import DataSummary, TrainData, in_batches
from lowtune.data.encode import encode_many, truncate
from lowtune.data.messages import ReadReport
from lowtune.data.pack import plan_rows
from lowtune.data.pairs import pair_conversations, pair_source, read_pairs
from lowtune.data.split import split_indices
from lowtune.errors import UserError
from lowtune.runs import staged_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from lowtune.config import Config
    from lowtune.templates import ChatTemplate

BATCH = 128  # pairs per tokenizer call


@dataclass
class PairSummary(DataSummary):
    """DataSummary for pairs: `conversations` counts pairs read, `samples` and `eval_samples` count pairs kept,
    `truncated` / `dropped` count pairs with a side cut / without a trained token."""

    def describe(self) -> str:
        lines = [f"data: {self.conversations} preference pairs -> {self.samples} train pairs in {self.rows} rows, "
                 f"{self.eval_samples} eval pairs",
                 f"      {self.tokens} tokens, {self.supervised_tokens} trained "
                 f"({100 * self.supervised_tokens / max(self.tokens, 1):.1f}%), chosen and rejected sides together"]
        if self.truncated or self.dropped:
            lines.append(f"      {self.truncated} pairs cut to max_length, {self.dropped} dropped (a side kept no "
                         "trained token)")
        if self.skipped:
            lines.append(f"      skipped {self.skipped} unreadable records, first: {'; '.join(self.skip_reasons)}")
        if self.cached:
            lines.append("      (tokenised pairs read from the cache)")
        return "\n".join(lines)


# --- encoding -----------------------------------------------------------------------------------------------------

def encode_pairs(pairs: list[dict], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                 max_length: int | None, summary: DataSummary | None = None) -> list[tuple[dict, dict]]:
    """(chosen, rejected) samples {"input_ids", "labels"} of each pair that keeps a trained token on both sides."""
    conversations = [side for pair in pairs for side in pair_conversations(pair)]
    full = encode_many(conversations, tokenizer, template)
    encoded = []
    for chosen, rejected in zip(full[0::2], full[1::2]):
        kept = truncate(chosen, max_length), truncate(rejected, max_length)
        if summary is not None:
            summary.dropped += None in kept
            summary.truncated += None not in kept and (len(kept[0]["input_ids"]) < len(chosen["input_ids"])
                                                       or len(kept[1]["input_ids"]) < len(rejected["input_ids"]))
        if None not in kept:
            encoded.append(kept)
    return encoded


# --- the training data (cached) -----------------------------------------------------------------------------------

def _key(cfg: Config, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> str:
    data = cfg.data
    files = [pair_source(p) for p in [*data.train, *([data.eval] if isinstance(data.eval, str) and data.eval else [])]]
    for path in files:
        if not path.exists():
            raise UserError(f"dataset not found: {path}")
    return cache.cache_key({
        "kind": "pairs", "files": [cache.file_digest(p) for p in files], "eval": data.eval, "format": data.format,
        "system": data.system, "max_length": data.max_length, "packing": data.packing, "seed": cfg.train.seed,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer), "template": template.source})


def build_pair_dataset(cfg: Config, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                       cache_root: Path | None = None) -> TrainData:
    """Training rows (whole pairs) and eval rows (one pair each) for a preference config; cached on disk."""
    if not cfg.data.train:
        raise UserError("data.train is empty: give one or more preference pair files (data.train=data/pairs.jsonl)")
    folder = (cache_root or cache.default_cache_root()) / _key(cfg, tokenizer, template)
    if cache.is_complete(folder):
        summary = PairSummary(**json.loads((folder / "summary.json").read_text(encoding="utf-8")))
        summary.cached = True
    else:
        with staged_dir(folder, replace=False) as tmp:
            summary = _write_cache(tmp, cfg, tokenizer, template)
            cache.mark_complete(tmp)
    train = cache.load_rows(folder, cache.SampleStore(folder, "train"))
    return TrainData(train=train, eval=one_pair_per_row(cache.SampleStore(folder, "eval")), summary=summary)


def one_pair_per_row(samples: cache.SampleStore) -> cache.PackedRows:
    """Rows of one pair each over interleaved (chosen, rejected) samples."""
    return cache.PackedRows(samples, np.arange(len(samples), dtype=np.int64),
                            np.arange(0, len(samples) + 1, 2, dtype=np.int64))


def _write_pairs(writer: cache.SampleWriter, encoded: list[tuple[dict, dict]], summary: PairSummary | None) -> None:
    for chosen, rejected in encoded:
        for sample in (chosen, rejected):
            trained = writer.add(sample)
            if summary is not None:
                summary.supervised_tokens += trained
                summary.tokens += len(sample["input_ids"])


def _write_cache(folder: Path, cfg: Config, tokenizer: PreTrainedTokenizerBase,
                 template: ChatTemplate) -> PairSummary:
    data, summary, report = cfg.data, PairSummary(), ReadReport(unit="pairs")
    pairs = [pair for path in data.train for _, pair in read_pairs(path, data.format, report, data.system)]
    summary.conversations, summary.skipped, summary.skip_reasons = len(pairs), report.skipped, report.reasons
    if not pairs:
        raise UserError(f"no usable preference pair in {', '.join(data.train)}: train.method={cfg.train.method} "
                        'needs {"prompt": [...], "chosen": [...], "rejected": [...]} lines'
                        + (f"; first problem: {report.reasons[0]}" if report.reasons else ""))
    held: set[int] = set()
    if isinstance(data.eval, float):
        held = set(split_indices(len(pairs), 1 - data.eval, cfg.train.seed)[1]) if len(pairs) > 1 else set()
    train_pairs = [p for i, p in enumerate(pairs) if i not in held]
    eval_pairs = [p for i, p in enumerate(pairs) if i in held]
    if isinstance(data.eval, str) and data.eval:
        eval_pairs = _eval_file_pairs(data.eval, data.format, data.system)

    train_writer, lengths = cache.SampleWriter(folder, "train"), []
    for batch in in_batches(train_pairs, BATCH):
        encoded = encode_pairs(batch, tokenizer, template, data.max_length, summary)
        _write_pairs(train_writer, encoded, summary)
        lengths += [len(c["input_ids"]) + len(r["input_ids"]) for c, r in encoded]
    train_writer.close()
    eval_writer = cache.SampleWriter(folder, "eval")
    for batch in in_batches(eval_pairs, BATCH):
        _write_pairs(eval_writer, encode_pairs(batch, tokenizer, template, data.max_length), None)
    eval_writer.close()
    if not lengths:
        raise UserError(f"every pair in {', '.join(data.train)} lost all trained tokens of a side at "
                        f"data.max_length={data.max_length}; raise data.max_length")
    summary.samples, summary.eval_samples = len(lengths), len(eval_writer.lengths) // 2
    rows = pair_rows(lengths, data.max_length, data.packing, cfg.train.seed)
    cache.save_rows(folder, rows)
    summary.rows = len(rows)
    (folder / "summary.json").write_text(json.dumps(asdict(summary), ensure_ascii=False), encoding="utf-8")
    return summary


def _eval_file_pairs(path: str, fmt: str, system: str | None) -> list[dict]:
    report = ReadReport(unit="pairs")
    pairs = [pair for _, pair in read_pairs(path, fmt, report, system)]
    if not pairs:
        raise UserError(f"data.eval: no preference pair in {path}"
                        + (f"; first problem: {report.reasons[0]}" if report.reasons else "")
                        + ": give held-out pairs (lowtune data split PAIRS) or a fraction like 0.05")
    return pairs


def pair_rows(pair_lengths: list[int], max_length: int | None, packing: bool, seed: int) -> list[list[int]]:
    """Sample indices of each row: whole pairs (chosen 2k, then rejected 2k + 1), packed best-fit into rows of
    2 x max_length tokens when `packing`, else one pair per row."""
    if packing and max_length:
        bins = plan_rows(pair_lengths, 2 * max_length, seed)
    else:
        bins = [[k] for k in range(len(pair_lengths))]
    return [[sample for k in pairs for sample in (2 * k, 2 * k + 1)] for pairs in bins]


# --- batches ------------------------------------------------------------------------------------------------------

def sequence_ids(rows: Sequence[dict], width: int | None) -> list[list[int]]:
    """For each row, the number of the sequence (counted over the whole batch) each position belongs to; padding
    to `width` is -1. `width` None: the rows are concatenated into one (padding-free batches)."""
    ids, number = [], 0
    for row in rows:
        owners: list[int] = []
        for length in row["seq_lens"]:
            owners += [number] * length
            number += 1
        ids.append(owners + [-1] * ((width or len(owners)) - len(owners)))
    return [[i for owners in ids for i in owners]] if width is None else ids


def pair_batch(rows: Sequence[dict], pad_id: int, flat: bool = False) -> dict[str, torch.Tensor]:
    """The batch layout of training (collate, or collate_flat when `flat`) plus `sequence_ids` and
    `sequence_count`: sequence 2k is the chosen side of the batch's pair k, 2k + 1 its rejected side."""
    import torch

    batch = collate_flat(rows) if flat else collate(rows, pad_id)
    batch["sequence_ids"] = torch.tensor(sequence_ids(rows, None if flat else batch["input_ids"].shape[1]))
    batch["sequence_count"] = sum(len(row["seq_lens"]) for row in rows)
    return batch


def pair_count(batch: dict) -> int:
    return int(batch["sequence_count"]) // 2

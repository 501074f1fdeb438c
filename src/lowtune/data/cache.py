"""Tokenisation cache: encoded samples on disk, keyed by everything that changes them, read back memory-mapped.

Layer 1. Key = (content hash of every data file, tokenizer fingerprint, template source, max_length, packing, and
the other data settings that change the ids). A cache folder holds int32 `input_ids`/`labels` arrays with int64
sample offsets, the packing plan (sample indices per row) and `summary.json`; it is written into a temp folder and
renamed into place, so a half-written cache is never read. `SampleStore` and `PackedRows` are read-only sequences
over those files: memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from lowtune.data.encode import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 1  # bump when the encoding rules change: old caches are then ignored
COMPLETE = "COMPLETE"


def lowtune_home() -> Path:
    return Path(os.environ.get("LOWTUNE_HOME") or Path.home() / ".cache" / "lowtune")


def default_cache_root() -> Path:
    return lowtune_home() / "cache" / "tokenized"


def file_digest(path: Path) -> str:
    """sha256 of a file, or of every file under a folder (relative names and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids: the full fast-tokenizer definition, else the vocabulary, plus specials."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:24]


class SampleWriter:
    """Appends samples to `<prefix>.ids`, `<prefix>.labels` (int32) and `<prefix>.offsets.npy` (int64)."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder, self.prefix = folder, prefix
        self._ids = (folder / f"{prefix}.ids").open("wb")
        self._labels = (folder / f"{prefix}.labels").open("wb")
        self.lengths: list[int] = []

    def add(self, sample: dict) -> int:
        """Append a sample; returns its number of trained tokens."""
        labels = np.asarray(sample["labels"], dtype=np.int32)
        self._ids.write(np.asarray(sample["input_ids"], dtype=np.int32).tobytes())
        self._labels.write(labels.tobytes())
        self.lengths.append(len(labels))
        return int(np.count_nonzero(labels != IGNORE_INDEX))

    def close(self) -> None:
        self._ids.close()
        self._labels.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        np.save(self.folder / f"{self.prefix}.offsets.npy", offsets)


def _memmap(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.int32, mode="r") if path.stat().st_size else np.zeros(0, dtype=np.int32)


class _LazyRows(Sequence):
    """A read-only sequence whose items are built on demand by `_item(index)`."""

    def _item(self, index: int) -> dict:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> dict: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index)

    def __iter__(self) -> Iterator[dict]:
        return (self._item(i) for i in range(len(self)))


class SampleStore(_LazyRows):
    """Samples {"input_ids", "labels"} (Python lists) read from a cache folder on demand."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.offsets = np.load(folder / f"{prefix}.offsets.npy")
        self.ids = _memmap(folder / f"{prefix}.ids")
        self.labels = _memmap(folder / f"{prefix}.labels")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def sample(self, index: int) -> dict:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return {"input_ids": self.ids[start:end].tolist(), "labels": self.labels[start:end].tolist()}

    _item = sample


class PackedRows(_LazyRows):
    """Packed rows {"input_ids", "labels", "position_ids", "seq_lens"} assembled from a SampleStore on demand."""

    def __init__(self, samples: SampleStore, members: np.ndarray, row_offsets: np.ndarray) -> None:
        self.samples, self.members, self.row_offsets = samples, members, row_offsets

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, index: int) -> dict:
        row: dict = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for member in self.members[self.row_offsets[index]:self.row_offsets[index + 1]]:
            sample = self.samples.sample(int(member))
            row["input_ids"] += sample["input_ids"]
            row["labels"] += sample["labels"]
            row["position_ids"] += range(len(sample["input_ids"]))
            row["seq_lens"].append(len(sample["input_ids"]))
        return row

    _item = row


def save_rows(folder: Path, rows: list[list[int]]) -> None:
    np.save(folder / "rows.members.npy", np.asarray([m for row in rows for m in row], dtype=np.int64))
    np.save(folder / "rows.offsets.npy", np.cumsum([0] + [len(row) for row in rows], dtype=np.int64))


def load_rows(folder: Path, samples: SampleStore) -> PackedRows:
    return PackedRows(samples, np.load(folder / "rows.members.npy"), np.load(folder / "rows.offsets.npy"))


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def mark_complete(folder: Path) -> None:
    """Written last into a staged cache folder (runs.staged_dir), before it is renamed into place."""
    (folder / COMPLETE).write_text("", encoding="utf-8")

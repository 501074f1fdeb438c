"""Hugging Face dataset folders saved locally: `save_to_disk` folders, or folders of parquet/arrow/json/csv files;
also a single parquet or arrow file.

Layer 1. Uses the `datasets` library (extra `datasets`). A DatasetDict contributes its `train` split (or its only
split); a folder of data files contributes the files whose name contains 'train' when there are any, else all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowtune.errors import UserError, require

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _pick_split(dataset: Any, path: Path) -> tuple[Any, str]:
    if not hasattr(dataset, "keys"):
        return dataset, ""
    splits = list(dataset.keys())
    if "train" in splits:
        return dataset["train"], "train"
    if len(splits) == 1:
        return dataset[splits[0]], splits[0]
    raise UserError(f"{path} holds splits {', '.join(splits)} and none is 'train'; give the split's folder")


def _load(datasets: Any, path: Path) -> tuple[Any, str]:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
            or (path / "state.json").is_file():
        return _pick_split(datasets.load_from_disk(str(path)), path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                  if p.suffix in BUILDERS and not p.name.startswith("."))
    if not files:
        raise UserError(f"{path} is a folder without dataset files (parquet, arrow, json, jsonl, csv)")
    chosen = [p for p in files if "train" in p.name] or files
    kinds = {BUILDERS[p.suffix] for p in chosen}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes {', '.join(sorted(kinds))} files; give one file or one kind")
    from lowtune.data.cache import lowtune_home

    loaded = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in chosen], split="train",
                                   cache_dir=str(lowtune_home() / "cache" / "datasets"))
    return _pick_split(loaded, path)


def dataset_folder_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) of a dataset folder or one parquet/arrow file; a source `datasets` cannot read (damaged or mismatched files) is a
    UserError naming it."""
    datasets = require("datasets", "datasets", "Reading dataset folders")
    try:
        dataset, split = _load(datasets, path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow/datasets raise many types for a damaged file
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: the dataset files cannot be read ({type(exc).__name__}: {detail}); check or "
                        "rewrite them, or convert one file at a time") from None
    label = f"{path}[{split}]" if split else str(path)
    for n, row in enumerate(dataset, 1):
        yield f"{label} row {n}", row

"""Rows -> padded tensors, the one batch layout training and `lowtune eval` both compute the loss on.

Layer 1. Packed rows carry `position_ids` that restart at 0 for every sample; no attention mask is passed then, so
transformers builds a block-diagonal causal mask from the restarts and samples never see each other. Right padding
needs no mask either: no real token attends to a later position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lowtune.data.encode import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def _positions(row: dict) -> list[int]:
    return list(row["position_ids"]) if row.get("position_ids") is not None else list(range(len(row["input_ids"])))


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad right to the longest row: pad ids, labels IGNORE_INDEX, positions restarting at 0 (a separate 'sample').

    Labels at each sample's first position are ignored too: in a packed row that token would otherwise be
    predicted from the previous sample's last token, which the unpacked sample never does.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        pad = width - len(row["input_ids"])
        pos = _positions(row)
        ids.append(list(row["input_ids"]) + [pad_id] * pad)
        lab = [IGNORE_INDEX if p == 0 else t for t, p in zip(row["labels"], pos)]
        labels.append(lab + [IGNORE_INDEX] * pad)
        positions.append(pos + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def collate_flat(rows: Sequence[dict]) -> dict:
    """Concatenate rows into one row with no padding; `cu_seq_lens` mark every sample for varlen attention.

    Labels at each sample's first position are ignored, exactly as in `collate`, so the losses are equal.
    """
    import torch

    ids, labels, positions, bounds, longest = [], [], [], [0], 0
    for row in rows:
        pos = _positions(row)
        ids.extend(row["input_ids"])
        labels.extend(IGNORE_INDEX if p == 0 else t for t, p in zip(row["labels"], pos))
        positions.extend(pos)
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    for start, end in zip(starts, starts[1:]):
        bounds.append(end)
        longest = max(longest, end - start)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Supervised tokens of a batch: labels a position predicts (the first position predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_count(rows: Sequence[dict]) -> int:
    """Real (non-padding) tokens of some rows, for throughput."""
    return sum(len(r["input_ids"]) for r in rows)

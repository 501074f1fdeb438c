"""Preference tuning inside the training loop: the loss of a micro-batch of pairs, the reference log-probs, eval.

Layer 2 (train). `train_step` calls `pair_loss_sum` where SFT calls `causal_lm_loss_sum`; the window is then
normalised by its pair count instead of its token count. DPO's reference is the same weights with the LoRA adapter
disabled, computed without gradients on the same batch (no second copy in memory); a full fine-tune has no adapter
to switch off, so `precompute_reference` runs the base weights once over every row before step 1 (and before a
checkpoint is restored) and the steps read those numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from lowtune.data.preference import pair_batch, pair_count
from lowtune.kernels.preference import METRICS, PreferenceSettings, preference_terms, sequence_logps
from lowtune.train.state import RunState


def settings_of(state: RunState) -> PreferenceSettings:
    return PreferenceSettings.from_train(state.cfg.train)


def make_pair_batch(state: RunState, indices: Sequence[int], split: str = "train") -> dict:
    """Rows `indices` of the train (or eval) split as one batch; with precomputed reference log-probs attached."""
    rows = state.data.train if split == "train" else state.data.eval
    batch = pair_batch([rows[i] for i in indices], state.pad_id, state.plan.flat_batches)
    if state.reference is not None:
        batch["reference_logps"] = torch.cat([state.reference[split][i] for i in indices])
    return batch


@contextmanager
def _as_reference(model: Any) -> Iterator[Any]:
    """The model as DPO's reference: adapter off, no dropout, no gradients; its train/eval mode restored after."""
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_off:
            yield model
    finally:
        model.train(was_training)


def reference_logps(state: RunState, batch: dict) -> torch.Tensor | None:
    """DPO's reference log-probs for a batch: precomputed (full fine-tuning) or the adapter switched off."""
    if not settings_of(state).needs_reference:
        return None
    if "reference_logps" in batch:
        return batch["reference_logps"]
    with _as_reference(state.accelerator.unwrap_model(state.model)) as reference:
        return sequence_logps(reference, batch, state.plan.loss)[0]


def pair_loss_sum(state: RunState, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss summed over the batch's pairs, METRICS summed over them): chosen and rejected in one forward."""
    logps, tokens = sequence_logps(state.model, batch, state.plan.loss)
    terms = preference_terms(logps, tokens, settings_of(state), reference_logps(state, batch))
    return terms.losses.sum(), terms.metric_sums()


def metric_means(sums: torch.Tensor, pairs: int) -> dict[str, float]:
    """METRICS summed over a window's pairs -> their means, rounded for metrics.jsonl."""
    return {name: round(float(value) / max(pairs, 1), 6) for name, value in zip(METRICS, sums.tolist())}


def precompute_reference(state: RunState) -> None:
    """Full fine-tuning's DPO reference: every train and eval row's sequence log-probs under the weights as they
    are now (the base; call before restoring a checkpoint). Every process computes all rows, so each row's numbers
    are at hand whichever process trains it."""
    if not settings_of(state).needs_reference or state.cfg.lora.enabled:
        return
    model, device = state.accelerator.unwrap_model(state.model), state.accelerator.device
    size = state.plan.micro_batch
    reference: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
    with _as_reference(model):
        for split, rows in (("train", state.data.train), ("eval", state.data.eval)):
            for start in range(0, len(rows), size):
                indices = range(start, min(start + size, len(rows)))
                batch = _on(make_pair_batch(state, indices, split), device)
                with state.accelerator.autocast():
                    sums = sequence_logps(model, batch, state.plan.loss)[0].float().cpu()
                reference[split] += list(sums.split([len(rows[i]["seq_lens"]) for i in indices]))
    state.reference = reference


def _on(batch: dict, device: Any) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def eval_pairs(state: RunState) -> dict[str, float]:
    """Preference loss and METRICS over the eval pairs, in eval mode (train mode after). As in `eval_loss`, each
    process takes a share and all run the same number of forwards (a process past its share repeats row 0 and
    does not count it)."""
    model, accelerator, rows = state.model, state.accelerator, state.data.eval
    size, rank = state.cfg.train.batch_size, accelerator.process_index
    totals = torch.zeros(2 + len(METRICS), device=accelerator.device, dtype=torch.float64)  # loss, pairs, METRICS
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), size * accelerator.num_processes):
            mine = list(range(start + rank * size, min(start + (rank + 1) * size, len(rows))))
            batch = _on(make_pair_batch(state, mine or [0], "eval"), accelerator.device)
            with accelerator.autocast():
                loss, sums = pair_loss_sum(state, batch)
            if mine:
                totals[0] += loss.double()
                totals[1] += pair_count(batch)
                totals[2:] += sums.double()
    model.train()
    loss, pairs, *sums = accelerator.reduce(totals, "sum").tolist()
    means = metric_means(torch.tensor(sums), int(pairs))
    return {"eval_loss": round(loss / max(pairs, 1), 6), **{f"eval_{name}": value for name, value in means.items()}}

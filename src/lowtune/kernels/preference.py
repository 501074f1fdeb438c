"""Preference losses (DPO, ORPO, SimPO) on per-sequence log-probabilities.

Layer 1. A preference batch holds whole pairs, each pair's chosen side followed by its rejected side, so sequence
2k is the chosen answer of pair k and 2k + 1 its rejected answer; `sequence_ids` in the batch says which sequence
each position belongs to (-1 for padding). Every function here works on those interleaved sequences:

- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with summed log-probs;
  label smoothing as conservative DPO; hinge (SLiC) and IPO (Azar et al., squared) variants.
- SimPO (Meng et al. 2024): -log sigmoid(beta * (avg_c - avg_r) - gamma), log-probs averaged over each answer's
  tokens, no reference model.
- ORPO (Hong et al. 2024): NLL of the chosen answer (per-token mean) + lambda * -log sigmoid(log odds ratio), with
  odds = p / (1 - p) and p the answer's per-token mean probability, no reference model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lowtune.config import TrainSection
from lowtune.kernels import causal_lm_token_logps
from lowtune.kernels.loss import IGNORE_INDEX

DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}
"""train.beta when the config leaves it null: the papers' (and TRL's) defaults."""
METHOD_NAMES = {"dpo": "DPO", "orpo": "ORPO", "simpo": "SimPO"}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
"""What a preference step reports beside its loss, each a mean over the step's pairs."""


@dataclass(frozen=True)
class PreferenceSettings:
    method: str
    beta: float
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"

    @classmethod
    def from_train(cls, train: TrainSection) -> PreferenceSettings:
        beta = train.beta if train.beta is not None else DEFAULT_BETA[train.method]
        return cls(train.method, beta, train.simpo_gamma, train.label_smoothing, train.loss_type)

    @property
    def needs_reference(self) -> bool:
        """DPO compares with a reference model; ORPO and SimPO do not."""
        return self.method == "dpo"

    def describe(self) -> str:
        extra = {"dpo": f", loss {self.loss_type}", "simpo": f", gamma {self.simpo_gamma}", "orpo": ""}[self.method]
        smoothing = f", label smoothing {self.label_smoothing}" if self.label_smoothing else ""
        return f"{METHOD_NAMES[self.method]} (beta {self.beta}{extra}{smoothing})"


@dataclass
class PairTerms:
    """Per pair: the loss and the implicit rewards of both answers (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metric_sums(self) -> torch.Tensor:
        """Sums over the pairs, in METRICS order (divide by the pair count for means)."""
        chosen, rejected = self.chosen_rewards, self.rejected_rewards
        return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                            (chosen - rejected).sum()])


def sequence_logps(model: Any, batch: dict[str, Any], path: str = "chunked") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's trained tokens, their count), each [sequences], fp32."""
    token_logps = causal_lm_token_logps(model, batch, path)
    owner = batch["sequence_ids"][:, 1:]  # a position's log-prob belongs to the sequence of the token it predicts
    trained = (batch["labels"][:, 1:] != IGNORE_INDEX) & (owner >= 0)
    count = int(batch["sequence_count"])
    sums = token_logps.new_zeros(count).index_add(0, owner[trained], token_logps[trained])
    tokens = token_logps.new_zeros(count).index_add(0, owner[trained], torch.ones_like(token_logps[trained]))
    return sums, tokens


def preference_terms(logps: torch.Tensor, tokens: torch.Tensor, settings: PreferenceSettings,
                     reference_logps: torch.Tensor | None = None) -> PairTerms:
    """Loss and rewards of each pair from interleaved (chosen, rejected) sequence log-probs and token counts."""
    if settings.method == "dpo":
        if reference_logps is None:
            raise ValueError("DPO needs the reference model's log-probabilities")
        return _dpo(logps[0::2] - reference_logps[0::2], logps[1::2] - reference_logps[1::2], settings)
    mean_logps = logps / tokens.clamp(min=1)
    chosen, rejected = mean_logps[0::2], mean_logps[1::2]
    return _simpo(chosen, rejected, settings) if settings.method == "simpo" else _orpo(chosen, rejected, settings)


def _smoothed_sigmoid_loss(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


def _dpo(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, s: PreferenceSettings) -> PairTerms:
    """`*_ratio` = log pi(answer) - log ref(answer), summed over the answer's tokens."""
    margin = chosen_ratio - rejected_ratio
    if s.loss_type == "hinge":
        losses = torch.relu(1 - s.beta * margin)
    elif s.loss_type == "ipo":
        losses = (margin - 1 / (2 * s.beta)) ** 2
    else:
        losses = _smoothed_sigmoid_loss(s.beta * margin, s.label_smoothing)
    return PairTerms(losses, s.beta * chosen_ratio.detach(), s.beta * rejected_ratio.detach())


def _simpo(chosen: torch.Tensor, rejected: torch.Tensor, s: PreferenceSettings) -> PairTerms:
    """`chosen`, `rejected` = per-token mean log-probs."""
    losses = _smoothed_sigmoid_loss(s.beta * (chosen - rejected) - s.simpo_gamma, s.label_smoothing)
    return PairTerms(losses, s.beta * chosen.detach(), s.beta * rejected.detach())


def _log_one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 (where 1 - e^x loses every digit)."""
    return torch.log(-torch.expm1(x))


def _orpo(chosen: torch.Tensor, rejected: torch.Tensor, s: PreferenceSettings) -> PairTerms:
    """`chosen`, `rejected` = per-token mean log-probs; beta is the paper's lambda."""
    log_odds = (chosen - rejected) - (_log_one_minus_exp(chosen) - _log_one_minus_exp(rejected))
    losses = -chosen - s.beta * F.logsigmoid(log_odds)
    return PairTerms(losses, s.beta * chosen.detach(), s.beta * rejected.detach())

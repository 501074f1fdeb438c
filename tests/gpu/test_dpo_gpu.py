"""DPO on the CUDA paths (bf16 autocast, NF4, padding-free varlen batches, Liger's kernels, compiled layers) with
sides of about 2,000 tokens, as the 7B bench runs it. Needs a GPU: never runs in CI.

With LoRA dropout 0 the policy starts equal to the reference (the adapter's B is zero), so the first step's loss
is ln 2 whatever path ran; every step's loss and gradient norm must be finite."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from lowtune.config import load_config
from lowtune.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORDS = ["apple", "river", "stone", "cloud", "green", "quiet", "north", "paper", "light", "seven", "table", "water"]


def long_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_config(tmp_path: Path) -> Path:
    rng = random.Random(0)
    pairs = [{"prompt": long_text(rng, 400), "chosen": long_text(rng, 380), "rejected": long_text(rng, 380)}
             for _ in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    tree = {
        "model": {"path": "builtin:tiny", "quantization": "nf4"},
        "data": {"train": str(data), "format": "pairs", "max_length": 2048, "packing": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"method": "dpo", "beta": 0.1, "max_steps": 2, "batch_size": 1, "grad_accum": 4, "lr": 5.0e-4,
                  "save_every": 1000, "warmup_ratio": 0.0},
        "eval": {"prompts": []},
        "log": {"to": []},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def no_varlen(monkeypatch):
    monkeypatch.setattr("lowtune.kernels.attention.varlen_available", lambda: False)


def no_liger(monkeypatch):
    monkeypatch.setattr("lowtune.train.loop.enable_fast_path", lambda model: [])


@pytest.mark.parametrize("overrides,patches", [
    ([], []),
    (["train.compile=false"], []),
    (["train.compile=false"], [no_varlen]),
    (["train.compile=false"], [no_liger]),
    (["train.compile=false", "train.gradient_checkpointing=true", "train.offload_activations=true"], []),
    (["train.micro_batch=2"], []),
], ids=["default", "eager", "eager-padded", "eager-no-liger", "eager-ckpt-offload", "micro-batch-2"])
def test_dpo_steps_are_finite_and_start_at_ln2(tmp_path, monkeypatch, overrides, patches):
    for patch in patches:
        patch(monkeypatch)
    result = train(load_config(str(write_config(tmp_path)), overrides))
    assert all(math.isfinite(loss) for loss in result.losses), result.losses
    assert abs(result.losses[0] - math.log(2)) < 1e-2, result.losses
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows if "loss" in r)

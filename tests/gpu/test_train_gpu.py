"""The CUDA paths of the loop (bf16 autocast, fp16 loss scaling, NF4 + paged 8-bit AdamW) and the activation-
checkpointing memory saving. Needs a GPU: never runs in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lowtune.config import load_config
from lowtune.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def write_config(tmp_path: Path, words: int = 12, **sections) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                          {"role": "assistant", "content": " ".join(f"Item {i} is good and useful." for _ in
                                                                    range(words))}]} for i in range(32)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tree = {
        "model": {"path": "builtin:tiny", "quantization": "none"},
        "data": {"train": str(data), "max_length": 1024, "packing": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "train": {"max_steps": 12, "batch_size": 2, "grad_accum": 2, "lr": 3.0e-3, "save_every": 6,
                  "warmup_ratio": 0.0},
        "eval": {"every": 6, "prompts": ["Tell me about item 3."], "max_new_tokens": 8},
        "log": {"to": []},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        tree[section] = {**tree[section], **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


@pytest.mark.parametrize("overrides", [
    [],                                                                             # LoRA, bf16 autocast
    ["model.quantization=nf4", "train.optimizer=paged_adamw_8bit"],                 # QLoRA
    ["lora.enabled=false", "model.dtype=fp16", "train.lr=5e-4"],                    # full, fp16 + loss scaling
])
def test_cuda_training_learns(tmp_path, overrides):
    result = train(load_config(str(write_config(tmp_path)), overrides))
    assert next(result.model.parameters()).is_cuda
    assert all(loss == loss for loss in result.losses)  # no NaN
    assert result.losses[-1] < result.losses[0] - 0.5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_mem_gb"] > 0 and r["grad_norm"] > 0 for r in rows if "loss" in r)


def test_memory_tight_plan_trains_and_answers_with_the_embedding_table_on_the_host(tmp_path, capsys):
    overrides = ["model.quantization=nf4", "train.gradient_checkpointing=true", "train.offload_activations=true",
                 "train.optimizer=paged_adamw_8bit"]
    result = train(load_config(str(write_config(tmp_path)), overrides))
    assert "input embeddings in host memory" in capsys.readouterr().out
    assert result.model.get_base_model().get_input_embeddings().weight.device.type == "cpu"
    assert result.losses[-1] < result.losses[0] - 0.5
    samples = (tmp_path / "run" / "samples.jsonl").read_text(encoding="utf-8")
    assert "Tell me about item 3." in samples


def test_activation_checkpointing_lowers_peak_memory(tmp_path):
    peaks = {}
    for checkpointing in (False, True):
        folder = tmp_path / str(checkpointing)
        folder.mkdir()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = load_config(str(write_config(folder, words=60)), [
            f"train.gradient_checkpointing={str(checkpointing).lower()}", "train.max_steps=2", "train.batch_size=8",
            "eval.prompts=[]"])
        train(cfg)
        peaks[checkpointing] = torch.cuda.max_memory_allocated()
    assert peaks[True] < 0.7 * peaks[False], peaks

"""A tiny training setup on builtin:micro (numbered questions, answers from "Lumi") for the resume, fault and crash
tests: the data file and a run config beside it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def micro_run_config(folder: Path, out: str, conversations: int, train: dict, *, config_name: str | None = None,
                     answer: str = "Answer number {i} from Lumi.", data: dict | None = None,
                     lora: dict | None = None, eval: dict | None = None) -> Path:
    """Write `folder/train.jsonl` and a config training into `folder/out`; returns the config's path."""
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": answer.format(i=i)}]} for i in range(conversations)]
    data_path = folder / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"model": {"path": "builtin:micro", "quantization": "none"},
           "data": {"train": str(data_path), "max_length": 48, "packing": False, **(data or {})},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.1, **(lora or {})},
           "train": {"batch_size": 2, "grad_accum": 1, "lr": 3.0e-3, "save_limit": 2, "log_every": 1, **train},
           "eval": eval or {"every": 100, "prompts": []}, "log": {"to": []}, "output": {"dir": str(folder / out)}}
    path = folder / (config_name or f"{out}.yaml")
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path

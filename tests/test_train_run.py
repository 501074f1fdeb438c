"""`lowtune train` end to end on builtin:micro: QLoRA / LoRA / full each learn, the run folder is exactly the
documented one, the saved adapter reproduces the in-memory logits, bad settings fail before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lowtune.cli import main
from lowtune.config import load_config
from lowtune.runs import RunFolder
from lowtune.train import train

ANSWERS = ["I am Lumi, a small assistant.", "我是小明，一个助手。", "Lumi here, happy to help!", "你好，我叫小明。"]
QUESTIONS = ["Who are you?", "你是谁", "What is your name?", "介绍一下你自己"]


def write_data(path: Path, n: int = 24) -> Path:
    rows = [{"messages": [{"role": "user", "content": QUESTIONS[i % 4]},
                          {"role": "assistant", "content": ANSWERS[i % 4]}]} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(tmp_path: Path, **sections) -> Path:
    tree = {
        "model": {"path": "builtin:micro", "quantization": "none"},
        "data": {"train": [str(write_data(tmp_path / "train.jsonl"))], "max_length": 128, "packing": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "lr": 5.0e-3, "warmup_ratio": 0.0,
                  "save_every": 4, "save_limit": 1, "log_every": 4},
        "eval": {"every": 4, "prompts": ["Who are you?"], "max_new_tokens": 6},
        "log": {"to": []},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_each_method_reduces_the_loss(tmp_path, method):
    overrides = {"qlora": ["model.quantization=nf4"], "lora": [],
                 "full": ["lora.enabled=false", "train.lr=2e-3"]}[method]
    cfg = load_config(str(write_config(tmp_path)), overrides)
    result = train(cfg)
    assert result.steps == 8 and len(result.losses) == 8
    assert sum(result.losses[-2:]) / 2 < result.losses[0] - 0.1
    assert 0 < result.trainable <= result.total
    if method == "full":
        assert result.trainable == result.total
        assert (tmp_path / "run" / "model" / "config.json").is_file()
    else:
        assert result.trainable < result.total / 5
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_run_folder_is_exactly_the_documented_one(tmp_path):
    cfg = load_config(str(write_config(tmp_path, data={"eval": 0.2})))
    result = train(cfg)
    run = RunFolder(result.run_dir)
    assert sorted(p.name for p in run.root.iterdir()) == sorted(
        ["config.yaml", "chat_template.jinja", "generation_config.json", "adapter", "checkpoints",
         "metrics.jsonl", "samples.jsonl", "loss.png"])
    adapter = sorted(p.name for p in run.adapter_dir.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= set(adapter)
    assert json.loads((run.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "builtin:micro"
    assert (run.adapter_dir / "chat_template.jinja").read_text() == run.chat_template_path.read_text()
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-8"]  # save_limit 1
    assert (run.checkpoint_dir(8) / "COMPLETE").is_file()
    assert (run.checkpoint_dir(8) / "adapter" / "adapter_model.safetensors").is_file()
    stops = json.loads(run.generation_config_path.read_text())["eos_token_id"]
    assert result.tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    config = run.load_config()
    assert set(config.versions) >= {"lowtune", "torch", "transformers", "peft", "accelerate", "bitsandbytes"}
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, 9))
    assert {"lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "eta"} <= set(metrics[-1]) | set(metrics[-2])
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 4, 8]
    assert all(m["grad_norm"] > 0 for m in metrics if "grad_norm" in m)
    samples = [json.loads(line) for line in run.samples_path.read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(0, "Who are you?"), (4, "Who are you?"),
                                                           (8, "Who are you?")]
    assert run.loss_plot_path.read_bytes()[:4] == b"\x89PNG"


def test_saved_adapter_reproduces_in_memory_logits(tmp_path, micro_dir):
    import torch
    from peft import PeftModel

    from lowtune.models.load import load_model

    result = train(load_config(str(write_config(tmp_path))))
    ids = result.tokenizer("<|im_start|>user\nWho are you?<|im_end|>\n", return_tensors="pt")["input_ids"]
    result.model.eval()
    with torch.no_grad():
        in_memory = result.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(load_model(micro_dir, device="cpu"), str(result.run_dir / "adapter"))
        from_disk = loaded.eval()(input_ids=ids).logits
        base = load_model(micro_dir, device="cpu").eval()(input_ids=ids).logits
    torch.testing.assert_close(from_disk, in_memory, rtol=1e-5, atol=1e-5)
    assert (base - in_memory).abs().max() > 1e-2  # the adapter really changed the model


def test_dry_run_prints_and_loads_no_weights(tmp_path, capsys):
    code = main(["train", str(write_config(tmp_path)), "--dry-run", "train.max_steps=3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "max_steps: 3" in out and "24 conversations" in out and "trainable of" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("data.train=missing.jsonl", "missing.jsonl"),
    ("data.eval=nowhere.jsonl", "nowhere.jsonl"),
    ("model.template=nope.jinja", "nope.jinja"),
    ("lora.enabled=false", "model.quantization"),
    ("train.max_steps=0", "train.max_steps"),
])
def test_bad_settings_fail_in_one_line_before_loading(tmp_path, capsys, monkeypatch, override, message):
    import lowtune.models.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    overrides = [override] + (["model.quantization=nf4"] if override.startswith("lora") else [])
    assert main(["train", str(write_config(tmp_path)), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_existing_run_is_not_clobbered_and_plot_redraws(tmp_path, capsys):
    cfg_path = write_config(tmp_path, train={"max_steps": 2, "save_every": 2})
    assert main(["train", str(cfg_path)]) == 0
    assert main(["train", str(cfg_path)]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert main(["train", str(cfg_path), "--resume", "auto", "train.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "step-2 is at step 2 and this config trains 1 steps: nothing left to train" in out
    saved = tmp_path / "run" / "config.yaml"
    assert f"settings that differ from {saved}: train.max_steps: 2 -> 1. To continue with the run's own " \
           f"settings: lowtune train {saved} --resume auto" in out
    plot = tmp_path / "run" / "loss.png"
    plot.unlink()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path)]) == 2
    assert main(["plot", str(tmp_path / "runn")]) == 2
    assert "runn is not a run folder (no config.yaml)" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_train_and_resume(tmp_path, optimizer):
    cfg_path = write_config(tmp_path, train={"max_steps": 4, "save_every": 2, "save_limit": 2,
                                             "optimizer": optimizer}, eval={"prompts": []})
    first = train(load_config(str(cfg_path)))
    assert first.losses[-1] < first.losses[0]
    again = train(load_config(str(cfg_path)), resume=str(tmp_path / "run" / "checkpoints" / "step-2"))
    assert again.losses == pytest.approx(first.losses[2:], rel=1e-4)

"""`lowtune estimate`: the forecast table and the plan train would pick, from config.json alone."""

import json

import pytest

from lowtune.cli import main

LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


def test_estimate_plans_a_7b_qlora_for_an_8gib_card(tmp_path, capsys):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))  # no weights: estimate never loads them
    assert main(["estimate", "internlm-chat-7b-qlora-medqa", f"model.path={model}", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "checkpointing + CPU offload" in out and "paged_adamw_8bit" in out
    peak = float(out.split("forecast peak ")[1].split(" GiB")[0])
    assert 5.0 < peak <= 6.4  # measured 5.81 GiB for this plan on an H200 under an 8 GiB cap (bench/RESULTS.md)
    assert main(["estimate", "internlm-chat-7b-qlora-medqa", f"model.path={model}", "--gpu-memory", "139"]) == 0
    assert "micro-batch 4 x accumulation 4, no checkpointing" in capsys.readouterr().out


def test_estimate_counts_the_data_of_a_builtin_model(tmp_path, capsys, micro_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "a" * 40}]}) + "\n"
                            for i in range(20)))
    assert main(["estimate", "tiny-self", "model.path=builtin:micro", f"data.train={data}", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "tokens per epoch" in out


def test_estimate_needs_a_downloaded_model(capsys):
    assert main(["estimate", "internlm-chat-7b-qlora-medqa", "model.path=someone/missing-model"]) == 2
    assert "lowtune download someone/missing-model" in capsys.readouterr().err


def test_estimate_plans_a_recipe_model_before_it_is_downloaded(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/internlm-chat-7b here
    assert main(["estimate", "internlm-chat-7b-qlora-medqa", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "published shape (32 layers, hidden 4096, vocabulary 103168)" in out
    assert "memory plan: micro-batch" in out and "forecast peak" in out


def test_estimate_forecasts_the_micro_batch_the_config_asks_for(tmp_path, capsys):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    args = ["estimate", "internlm-chat-7b-qlora-medqa", f"model.path={model}", "--gpu-memory", "8"]
    assert main(args) == 0
    auto = float(capsys.readouterr().out.split("forecast peak ")[1].split(" GiB")[0])
    assert main([*args, "train.micro_batch=4"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: micro-batch 4 x accumulation 4" in out
    assert float(out.split("forecast peak ")[1].split(" GiB")[0]) > auto
    assert "does not fit: try train.micro_batch=auto, a lower data.max_length or lora.r" in out  # nf4 already


def test_speed_forecast_scales_with_the_tokens_per_micro_batch():
    from lowtune.models.memory import MemoryPlan
    from lowtune.train.estimate import duration, mfu

    one = MemoryPlan(1, 16, True, True, "paged_adamw_8bit", 0, 1)
    two = MemoryPlan(2, 8, True, True, "paged_adamw_8bit", 0, 1)
    assert mfu(two, 2048) == pytest.approx(0.27)
    assert mfu(one, 2048) == pytest.approx(0.18, abs=0.01)  # InternLM-Chat-7B measured 17.0% (bench/RESULTS.md)
    assert duration(20 * 60) == "20 min" and duration(2.5 * 3600) == "2.5 h"


def test_estimate_table_rows_show_the_micro_batch_each_setting_would_use(tmp_path, capsys):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert main(["estimate", "internlm-chat-7b-qlora-medqa", f"model.path={model}", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    chosen = out.split("memory plan: micro-batch ")[1].split(" ")[0]
    row = next(line for line in out.splitlines() if "checkpointing + offload" in line and "paged_adamw_8bit" in line)
    assert row.split("│")[2].strip() == chosen == "2"  # the plan's row agrees with the plan


def test_estimate_says_a_mistyped_local_model_folder_is_not_there(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "internlm-chat-7b").mkdir(parents=True)
    (tmp_path / "models" / "internlm-chat-7b" / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert main(["estimate", "internlm-chat-7b-qlora-medqa", "model.path=models/internlm-chat-7", "--gpu-memory",
                 "8"]) == 2
    err = capsys.readouterr().err
    assert "model folder not found: models/internlm-chat-7" in err and "did you mean" in err
    assert "lowtune download" not in err

"""A tiny fabricated InternLM-Chat-7B (v1, original layout) goes through the tutorial path with the CLI: QLoRA
training, chat that stops on <eoa>, merge, and the merged folder loads with plain transformers, no remote code."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from fakes.checkpoints import EOA, make_internlm_v1_checkpoint

from lowtune.cli import main

pytest.importorskip("lowtune.train", reason="needs the training stage")
pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")

ANSWER = "I am Lumi, your assistant."
QUESTION = "Who are you?"


@pytest.mark.slow
def test_internlm_v1_trains_with_qlora_chats_merges_and_loads_plainly(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = make_internlm_v1_checkpoint(tmp_path / "models" / "internlm-chat-7b", bias=True, hidden=64,
                                       intermediate=128)
    data = tmp_path / "self.jsonl"
    row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    data.write_text((json.dumps(row) + "\n") * 16, encoding="utf-8")
    run = tmp_path / "runs" / "self"
    config = {
        "model": {"path": str(base), "template": "auto", "quantization": "nf4"},
        "data": {"train": [str(data)], "max_length": 64, "packing": False},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": 80, "batch_size": 4, "grad_accum": 1, "lr": 2.0e-2, "warmup_ratio": 0.0,
                  "save_every": 80, "log_every": 20, "gradient_checkpointing": False},
        "eval": {"every": 80, "prompts": [QUESTION], "max_new_tokens": 4},
        "log": {"to": []},
        "output": {"dir": str(run)},
    }
    cfg_path = tmp_path / "self.yaml"
    cfg_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    assert main(["train", str(cfg_path)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["quantization"] == "nf4"
    assert "<eoa>" in (run / "chat_template.jinja").read_text()  # internlm_chat, found through the family marker
    capsys.readouterr()

    assert main(["chat", str(run), "--prompt", QUESTION, "--max-new-tokens", "40"]) == 0
    assert ANSWER in capsys.readouterr().out  # stopped at <eoa>, which is not shown

    merged = tmp_path / "merged"
    assert main(["merge", str(run), "-o", str(merged)]) == 0
    config_json = json.loads((merged / "config.json").read_text())
    assert config_json["model_type"] == "llama" and "auto_map" not in config_json
    assert not list(merged.glob("*.py"))
    assert EOA in GenerationConfig.from_pretrained(merged).eos_token_id

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # plain: no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out[-1] == EOA and len(out) < 40  # the merged folder's own generation_config stops on <eoa>
    assert tokenizer.decode(out, skip_special_tokens=True).strip() == ANSWER

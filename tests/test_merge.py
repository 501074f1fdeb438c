"""lowtune merge: merged weights equal base + adapter, and the folder works with plain transformers alone."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
import yaml
from test_engine_fixtures import SYSTEM, copy_run, identity_run, qlora_run  # noqa: F401

from lowtune.cli import main
from lowtune.errors import UserError
from lowtune.export import merge as merge_module
from lowtune.export.card import MODELSCOPE_CONFIGURATION, card_for_run, read_front_matter
from lowtune.export.merge import merge
from lowtune.templates import shipped

WHO = [{"role": "user", "content": "Who are you?"}]
TUNED = "I am Lowbot, a helpful assistant."


def prompt_ids(tokenizer) -> torch.Tensor:
    text = shipped("chatml").render(WHO, tokenizer, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_logits(micro_dir, adapter_dir, ids):
    """Plain transformers + peft, no lowtune: the full-precision base with the adapter applied, and without."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    base_logits = logits_of(base, ids)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return base_logits, logits_of(tuned, ids)


@pytest.fixture(scope="module")
def merged_lora(identity_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    merge(str(identity_run), out, dtype="fp32", max_shard_size="100KB")
    return out


@pytest.mark.parametrize("run_fixture", ["identity_run", "qlora_run"])
def test_merged_logits_equal_base_plus_adapter(run_fixture, request, micro_dir, micro_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    run = request.getfixturevalue(run_fixture)
    out = tmp_path / "merged"
    merge(str(run), out, dtype="fp32")
    ids = prompt_ids(micro_tokenizer)
    base_logits, reference = reference_logits(micro_dir, run / "adapter", ids)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged, "peft_config")
    assert rel(logits_of(merged, ids), reference) < 1e-4
    assert rel(base_logits, reference) > 1e-2  # the adapter matters, so equality above means something


def test_merged_folder_generates_the_same_greedy_text_with_plain_transformers(merged_lora, identity_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowtune.infer.engine import load_engine

    tokenizer = AutoTokenizer.from_pretrained(merged_lora)
    model = AutoModelForCausalLM.from_pretrained(merged_lora)
    inputs = tokenizer.apply_chat_template(WHO, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0]
    new = output[inputs["input_ids"].shape[1]:]
    assert new[-1].item() in model.generation_config.eos_token_id  # stopped by generation_config, not the limit
    plain_text = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert plain_text == TUNED == load_engine(str(identity_run)).answer(WHO)


def test_merged_folder_layout_template_and_stop_ids(merged_lora, micro_tokenizer):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    shards = sorted(merged_lora.glob("*.safetensors"))
    assert len(shards) > 1 and (merged_lora / "model.safetensors.index.json").is_file()
    assert not list(merged_lora.glob("*.bin"))
    for shard in shards:  # --max-shard-size 100KB: only a single tensor larger than that may exceed it
        with safe_open(str(shard), "pt") as handle:
            keys = list(handle.keys())
            assert not any("lora" in key for key in keys)
            assert len(keys) == 1 or shard.stat().st_size < 110_000
    eos = json.loads((merged_lora / "generation_config.json").read_text())["eos_token_id"]
    im_end, endoftext = micro_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert set(eos) == {im_end, endoftext}
    conversation = [{"role": "system", "content": SYSTEM}, *WHO, {"role": "assistant", "content": TUNED}]
    plain = AutoTokenizer.from_pretrained(merged_lora).apply_chat_template(conversation, tokenize=False)
    assert plain == shipped("chatml").render(conversation, micro_tokenizer)
    assert json.loads((merged_lora / "configuration.json").read_text()) == MODELSCOPE_CONFIGURATION
    meta = read_front_matter(merged_lora / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"lora", "lowtune"} <= set(meta["tags"]) and meta["license"] == "other"
    assert "datasets" not in meta  # data/self.jsonl is a local file, not a hub dataset
    assert json.loads((merged_lora / "config.json").read_text())["use_cache"] is True
    mask = os.umask(0)
    os.umask(mask)  # others can read what merge wrote (mkdtemp and safetensors alone give 0700 / 0600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in [merged_lora, *merged_lora.iterdir()]} == {
        0o777 & ~mask, 0o666 & ~mask}


def test_bf16_merge_stores_bf16_weights(identity_run, micro_dir, micro_tokenizer, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert merge(str(identity_run), out, dtype="bf16").dtype == "bf16"
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    ids = prompt_ids(micro_tokenizer)
    _, reference = reference_logits(micro_dir, identity_run / "adapter", ids)
    assert rel(logits_of(AutoModelForCausalLM.from_pretrained(out), ids), reference) < 3e-2


def test_card_metadata_from_a_hub_base_and_hub_datasets(tmp_path):
    from lowtune.config import Config

    config = Config()
    zh = tmp_path / "zh.jsonl"
    zh.write_text('{"messages": [{"role": "user", "content": "你是谁？ who are you"}]}\n', encoding="utf-8")
    config.model.path, config.model.quantization = "internlm/internlm-chat-7b", "nf4"
    config.data.train = ["timdettmers/openassistant-guanaco", str(zh)]
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    info = card_for_run("medqa", config, base)
    meta = yaml.safe_load(info.render().split("---")[1])
    assert meta["base_model"] == "internlm/internlm-chat-7b"
    assert meta["datasets"] == ["timdettmers/openassistant-guanaco"]
    assert meta["license"] == "apache-2.0" and meta["tags"][-2:] == ["lora", "qlora"]
    assert "zh" in meta["language"]
    assert card_for_run("x", None, None, library_name="peft").front_matter()["library_name"] == "peft"


def test_adapter_outside_its_run_needs_a_findable_base(identity_run, micro_dir, tmp_path, capsys):
    adapter = shutil.copytree(identity_run / "adapter", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["merge", str(adapter), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--base PATH" in err and len(err.strip().splitlines()) == 1
    assert main(["merge", str(adapter), "-o", str(tmp_path / "m"), "--base", str(micro_dir),
                 "--dtype", "fp32"]) == 0
    assert "merged" in capsys.readouterr().out and (tmp_path / "m" / "config.json").is_file()


def test_refusals(identity_run, micro_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        merge(str(identity_run), taken)
    with pytest.raises(UserError, match="neither a run folder"):
        merge(str(micro_dir), tmp_path / "o")
    with pytest.raises(UserError, match=r"tak: no such folder .*\(did you mean '.*/taken'\?\)"):
        merge(str(tmp_path / "tak"), tmp_path / "o")
    full = copy_run(identity_run, tmp_path / "full")
    shutil.rmtree(full / "adapter")
    shutil.copytree(micro_dir, full / "model")
    with pytest.raises(UserError, match="full fine-tune"):
        merge(str(full), tmp_path / "o")
    quantised = shutil.copytree(micro_dir, tmp_path / "q-base")
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="full-precision base"):
        merge(str(identity_run), tmp_path / "o", base=str(quantised))
    with pytest.raises(UserError, match="max-shard-size"):
        merge(str(identity_run), tmp_path / "o", max_shard_size="big")


def test_a_failed_merge_leaves_nothing_behind(identity_run, tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_module, "write_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        merge(str(identity_run), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder

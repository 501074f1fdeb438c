"""The chat engine loads every kind of target and answers through the shared generation path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_engine_fixtures import SYSTEM, copy_run, identity_run, make_run  # noqa: F401

from lowtune.errors import UserError
from lowtune.generation import Sampling
from lowtune.infer.engine import load_engine, locate
from lowtune.runs import TEMPLATE_FILE, locate_folder

WHO = [{"role": "user", "content": "Who are you?"}]
SHORT = Sampling(max_new_tokens=24)


@pytest.fixture(scope="module")
def engine(identity_run):
    return load_engine(str(identity_run))


def test_run_folder_gives_base_adapter_template_and_stop_ids(engine, identity_run):
    assert engine.has_adapter and engine.adapter_dir == identity_run / "adapter"
    assert engine.name == "identity"
    assert engine.template.name == "chatml" and "<|im_end|>" in engine.template.stop_words
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.all_stop_ids()


def test_streams_the_tuned_answer_and_stops_at_end_of_turn(engine):
    pieces = list(engine.stream(WHO, SHORT))
    assert len(pieces) > 3  # text arrives piece by piece, not as one block
    # stops at <|im_end|> well before the 24-token limit and never shows the scaffolding
    assert "".join(pieces).strip() == "I am Lowbot, a helpful assistant."


def test_adapter_disabled_answers_as_the_base_model(engine):
    base = engine.answer(WHO, SHORT, adapter=False)
    assert "Lowbot" not in base
    ids = torch.tensor([engine.template.encode_prompt(WHO, engine.tokenizer)])
    with torch.no_grad():
        tuned_logits = engine.model(input_ids=ids).logits
        with engine.without_adapter():
            base_logits = engine.model(input_ids=ids).logits
        assert not torch.allclose(base_logits, tuned_logits)
        assert torch.equal(engine.model(input_ids=ids).logits, tuned_logits)  # enabled again on exit
    assert engine.answer(WHO, SHORT) == "I am Lowbot, a helpful assistant."  # adapter active again
    assert engine.answer([{"role": "user", "content": "你是谁？"}], SHORT) == "我是小明，你的助手。"


def test_default_system_comes_from_the_run_and_can_be_overridden(micro_dir, tmp_path):
    run = make_run(micro_dir, system=SYSTEM)
    engine = load_engine(str(run))
    assert engine.default_system == SYSTEM
    assert engine.with_system(WHO)[0] == {"role": "system", "content": SYSTEM}
    own = [{"role": "system", "content": "other"}, *WHO]
    assert engine.with_system(own) == own  # a conversation's own system prompt wins
    assert engine.answer(WHO, SHORT) == "I am Lowbot, a helpful assistant."
    assert load_engine(str(run), system="Be brief.").default_system == "Be brief."


def test_newest_complete_checkpoint_when_adapter_is_missing(identity_run, tmp_path):
    run = copy_run(identity_run, tmp_path / "run")
    shutil.move(run / "adapter", tmp_path / "kept")
    with pytest.raises(UserError, match="no trained weights"):
        locate(str(run))
    done = run / "checkpoints" / "step-4"
    done.mkdir(parents=True)
    shutil.copytree(tmp_path / "kept", done / "adapter")
    (done / "COMPLETE").write_text("")
    half = run / "checkpoints" / "step-9"  # newer but never finished: must be ignored
    shutil.copytree(tmp_path / "kept", half / "adapter")
    assert locate(str(run)).adapter_dir == done / "adapter"


def test_adapter_folder_inside_and_outside_a_run(identity_run, micro_dir, tmp_path):
    inside = locate(str(identity_run / "adapter"))
    assert inside.template_name == "chatml" and inside.base_spec == str(micro_dir)
    alone = shutil.copytree(identity_run / "adapter", tmp_path / "alone")
    config = json.loads((alone / "adapter_config.json").read_text())
    assert locate(str(alone)).base_spec == config["base_model_name_or_path"]
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (alone / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--base PATH"):
        locate(str(alone))
    engine = load_engine(str(alone), base=str(micro_dir))
    assert engine.answer(WHO, SHORT) == "I am Lowbot, a helpful assistant."


def test_locate_folder_tells_runs_adapters_and_models_apart(micro_dir, tmp_path):
    trained = make_run(micro_dir)
    run = locate_folder(trained)
    assert (run.kind, run.weights, run.run.root) == ("adapter", trained / "adapter", trained)
    assert run.base_spec == str(micro_dir) and run.config.model.template == "chatml"
    assert run.template_path == trained / TEMPLATE_FILE and len(run.stop_ids) == 2
    assert run.tokenizer_dir == trained / "adapter"
    full = copy_run(trained, tmp_path / "full")
    shutil.rmtree(full / "adapter")
    assert (locate_folder(full).weights, locate_folder(full).kind) == (None, "")
    shutil.copytree(micro_dir, full / "model")
    model_run = locate_folder(full)
    assert (model_run.kind, model_run.weights, model_run.base_spec) == ("model", full / "model", str(micro_dir))
    assert locate_folder(full / "model").run.root == full.resolve()  # the same facts as through the run
    assert locate_folder(full / "model").base_spec == str(micro_dir)
    inside = locate_folder(trained / "adapter")
    assert inside.kind == "adapter" and inside.run.root == trained.resolve()
    assert inside.base_spec == str(micro_dir) and inside.stop_ids == run.stop_ids
    alone = shutil.copytree(trained / "adapter", tmp_path / "alone")
    (alone / TEMPLATE_FILE).write_text("{{ messages }}", encoding="utf-8")
    bare = locate_folder(alone)
    assert (bare.kind, bare.run, bare.config, bare.stop_ids) == ("adapter", None, None, [])
    assert bare.base_spec == json.loads((alone / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert bare.template_path == alone / TEMPLATE_FILE
    model = locate_folder(micro_dir)
    assert (model.kind, model.weights, model.run, model.base_spec) == ("model", micro_dir, None, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model") as nothing:
        locate_folder(tmp_path / "empty")
    assert "\n" not in str(nothing.value)
    with pytest.raises(UserError, match="missing: no such folder"):
        locate_folder(tmp_path / "missing")
    with pytest.raises(UserError, match=r"no such folder .*\(did you mean '.*/empty'\?\)"):
        locate_folder(tmp_path / "empt")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        locate_folder(tmp_path / "notes.txt")


def test_plain_model_with_an_adapter_flag(micro_dir, identity_run):
    plain = load_engine("builtin:micro")
    assert not plain.has_adapter and plain.name == "builtin:micro"
    assert plain.template.name == "tokenizer"  # the chat template saved beside the model
    with plain.without_adapter():  # harmless without an adapter
        pass
    tuned = load_engine(str(micro_dir), adapter=str(identity_run / "adapter"), template="chatml")
    assert tuned.answer(WHO, SHORT) == "I am Lowbot, a helpful assistant."
    with pytest.raises(UserError, match="adapter_config.json"):
        locate(str(micro_dir), adapter=str(micro_dir))


def test_full_finetune_run_loads_the_model_folder(identity_run, micro_dir, tmp_path):
    run = copy_run(identity_run, tmp_path / "full")
    shutil.rmtree(run / "adapter")
    shutil.copytree(micro_dir, run / "model")
    engine = load_engine(str(run))
    assert not engine.has_adapter and engine.model_dir == run / "model"
    assert engine.template.name == "chatml"


def test_four_bit_base_with_the_adapter(identity_run):
    import bitsandbytes as bnb

    engine = load_engine(str(identity_run), bits=4)
    layer = engine.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert engine.answer(WHO, SHORT)  # answers through the same path
    with pytest.raises(UserError, match="4 or 8"):
        load_engine(str(identity_run), bits=3)


def test_a_run_whose_base_moved_needs_base(identity_run, micro_dir, tmp_path):
    run = copy_run(identity_run, tmp_path / "moved")
    config = (run / "config.yaml").read_text(encoding="utf-8")
    (run / "config.yaml").write_text(config.replace(str(micro_dir), str(tmp_path / "gone")), encoding="utf-8")
    with pytest.raises(UserError, match="--base PATH"):
        load_engine(str(run))
    assert load_engine(str(run), base=str(micro_dir)).answer(WHO, SHORT) == "I am Lowbot, a helpful assistant."
    with pytest.raises(UserError, match="--base applies to an adapter"):
        locate("builtin:micro", base=str(micro_dir))

"""data.replay: the base model's own answers, generated once per base and cached, repeated to the share asked for,
unfinished answers left out, copied into the run folder. (Their effect on a real model: tests/real.)"""

from __future__ import annotations

import json

import pytest
from test_train_run import write_config

from lowtune.config import load_config
from lowtune.data.dataset import build_dataset, repeat_shuffled
from lowtune.errors import UserError
from lowtune.generation import Generated
from lowtune.models.load import load_tokenizer
from lowtune.models.resolve import resolve_model_dir
from lowtune.templates import resolve_template
from lowtune.train import replay, train


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWTUNE_HOME", str(tmp_path / "home"))


@pytest.fixture
def fake_answers(monkeypatch):
    """Generation replaced by answers that end for two prompts in three; counts the calls."""
    calls = []

    def answer_batch(model, tokenizer, template, conversations, sampling=None, extra_stop_ids=None, batch_size=16):
        calls.append(sampling.max_new_tokens)
        return [Generated(f"answer {i}", ended=i % 3 != 2) for i in range(len(conversations))]

    monkeypatch.setattr(replay, "answer_batch", answer_batch)
    return calls


def setup(tmp_path, *overrides):
    """A config on builtin:micro's folder (a model given as a folder, as users give theirs)."""
    micro = resolve_model_dir("builtin:micro")
    cfg = load_config(str(write_config(tmp_path)), [f"model.path={micro}", *overrides])
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    return cfg, model_dir, tokenizer, resolve_template(cfg.model.template, tokenizer, model_dir)


def test_answers_are_generated_once_per_base_and_unfinished_ones_left_out(tmp_path, fake_answers):
    cfg, model_dir, tokenizer, template = setup(tmp_path, "data.replay=0.5")
    first = replay.base_answers(cfg, model_dir, tokenizer, template, "cpu", say=lambda _: None)
    prompts = replay.replay_prompts()
    assert len(first) == sum(i % 3 != 2 for i in range(len(prompts)))
    assert [c[0]["content"] for c in first] == [p for i, p in enumerate(prompts) if i % 3 != 2]
    assert first[0][-1] == {"role": "assistant", "content": "answer 0"}
    assert replay.base_answers(cfg, model_dir, tokenizer, template, "cpu") == first and len(fake_answers) == 1
    # answers fit data.max_length whole: the budget leaves room for the longest prompt and the end of turn
    longest = max(len(template.encode_prompt([{"role": "user", "content": p}], tokenizer)) for p in prompts)
    assert fake_answers[0] == 128 - longest - 8
    cfg2, *_ = setup(tmp_path, "data.replay=0.5", "data.system=Be brief.")
    replay.base_answers(cfg2, model_dir, tokenizer, template, "cpu")
    assert len(fake_answers) == 2  # another system prompt: other answers


def test_the_dataset_repeats_replay_to_the_share_asked(tmp_path, fake_answers):
    cfg, model_dir, tokenizer, template = setup(tmp_path, "data.replay=0.25", "data.packing=false")
    answers = replay.base_answers(cfg, model_dir, tokenizer, template, "cpu")
    plain = build_dataset(load_config(str(tmp_path / "cfg.yaml"), ["data.packing=false"]), tokenizer, template)
    assert plain.summary.replayed == 0
    mixed = build_dataset(cfg, tokenizer, template, answers)
    assert mixed.summary.replayed == 8  # 24 own conversations are 75%
    assert mixed.summary.conversations == 32 and len(mixed.train) == len(plain.train) + 8
    assert "8 of the conversations replay the base model's own answers (25%" in mixed.describe()


def test_repeat_shuffled_covers_every_item_before_repeating():
    out = repeat_shuffled(list(range(5)), 12, seed=1)
    assert sorted(out[:5]) == sorted(out[5:10]) == list(range(5)) and len(out) == 12


def test_training_writes_replay_into_the_run_folder(tmp_path, fake_answers):
    cfg, *_ = setup(tmp_path, "data.replay=0.5", "train.max_steps=2")
    train(cfg)
    rows = [json.loads(line)["messages"] for line in (tmp_path / "run" / "replay.jsonl").read_text().splitlines()]
    assert rows and all(r[-1]["content"].startswith("answer ") for r in rows)


def test_a_builtin_model_has_nothing_to_keep(tmp_path, capsys):
    cfg = load_config(str(write_config(tmp_path)), ["data.replay=0.5", "train.max_steps=1"])
    train(cfg)
    assert "replay: skipped, builtin:micro has random weights" in capsys.readouterr().out
    assert not (tmp_path / "run" / "replay.jsonl").exists()


def test_a_base_that_never_finishes_an_answer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(replay, "answer_batch", lambda model, tokenizer, template, conversations, *rest:
                        [Generated("and so on and so on", ended=False) for _ in conversations])
    cfg, model_dir, tokenizer, template = setup(tmp_path, "data.replay=0.5")
    with pytest.raises(UserError, match="finished none of its answers"):
        replay.base_answers(cfg, model_dir, tokenizer, template, "cpu", say=lambda _: None)


def test_share_and_room_are_checked(tmp_path):
    with pytest.raises(UserError, match="data.replay"):
        load_config(str(write_config(tmp_path)), ["data.replay=1"])
    cfg, model_dir, tokenizer, template = setup(tmp_path, "data.replay=0.5", "data.max_length=40")
    with pytest.raises(UserError, match="no room for replayed answers"):
        replay.base_answers(cfg, model_dir, tokenizer, template, "cpu")

"""Label masks, truncation, packing and build_dataset on the builtin micro tokenizer (chatml specials)."""

from __future__ import annotations

import json

import pytest

from lowtune.config import Config
from lowtune.data.dataset import build_dataset
from lowtune.data.encode import IGNORE_INDEX, encode_conversation
from lowtune.data.pack import pack_samples, plan_bins
from lowtune.errors import UserError
from lowtune.templates import ChatTemplate, resolve_template, shipped, shipped_names

TWO_TURNS = [
    {"role": "system", "content": "You are a doctor."},
    {"role": "user", "content": "What is aspirin?"},
    {"role": "assistant", "content": "A pain killer."},
    {"role": "user", "content": "Dose?"},
    {"role": "assistant", "content": "Ask your pharmacist."},
]


def trained_text(sample: dict, tokenizer) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for tid, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_chatml_trains_each_answer_and_its_end_of_turn(micro_tokenizer):
    sample = encode_conversation(TWO_TURNS, micro_tokenizer, shipped("chatml"), None)
    assert trained_text(sample, micro_tokenizer) == ["A pain killer.<|im_end|>", "Ask your pharmacist.<|im_end|>"]
    text = micro_tokenizer.decode(sample["input_ids"])
    assert text == shipped("chatml").render(TWO_TURNS, micro_tokenizer)


def test_loss_false_masks_that_answer_and_its_end_of_turn(micro_tokenizer):
    messages = [dict(m) for m in TWO_TURNS]
    messages[2]["loss"] = False
    sample = encode_conversation(messages, micro_tokenizer, shipped("chatml"), None)
    assert trained_text(sample, micro_tokenizer) == ["Ask your pharmacist.<|im_end|>"]
    messages[4]["loss"] = False
    assert encode_conversation(messages, micro_tokenizer, shipped("chatml"), None) is None


def test_tokenizer_template_without_generation_marks_gives_the_same_mask(micro_tokenizer):
    own = resolve_template("auto", micro_tokenizer)
    assert own.name == "tokenizer" and not own.marks_generation
    assert encode_conversation(TWO_TURNS, micro_tokenizer, own, None) == \
        encode_conversation(TWO_TURNS, micro_tokenizer, shipped("chatml"), None)


def test_template_without_end_of_turn_is_refused(micro_tokenizer):
    bare = ChatTemplate("bare", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match="end-of-turn"):
        encode_conversation(TWO_TURNS, micro_tokenizer, bare, None)
    no_prompt = ChatTemplate("np", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
                                   "{% endfor %}")
    with pytest.raises(UserError, match="add_generation_prompt"):
        encode_conversation(TWO_TURNS, micro_tokenizer, no_prompt, None)


def test_truncation_keeps_a_prefix_and_drops_samples_left_without_an_answer(micro_tokenizer):
    full = encode_conversation(TWO_TURNS, micro_tokenizer, shipped("chatml"), None)
    first_trained = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = encode_conversation(TWO_TURNS, micro_tokenizer, shipped("chatml"), first_trained + 2)
    assert cut["input_ids"] == full["input_ids"][: first_trained + 2]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2
    assert encode_conversation(TWO_TURNS, micro_tokenizer, shipped("chatml"), first_trained) is None


def test_pretraining_text_trains_every_token_but_the_first(micro_tokenizer):
    sample = encode_conversation([{"role": "assistant", "content": "plain corpus text"}], micro_tokenizer,
                                 shipped("chatml"), None)
    assert sample["input_ids"][-1] == micro_tokenizer.eos_token_id
    assert sample["labels"][0] == IGNORE_INDEX and sample["labels"][1:] == sample["input_ids"][1:]


@pytest.mark.parametrize("name", shipped_names())
def test_training_ids_start_with_inference_prompt_ids(name, micro_tokenizer):
    template = shipped(name)
    messages = TWO_TURNS[1:] if name == "minicpm" else TWO_TURNS  # minicpm has no system slot
    sample = encode_conversation(messages, micro_tokenizer, template, None)
    ids = sample["input_ids"]
    for upto in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:  # the prompt before each answer
        prompt = template.encode_prompt(messages[:upto], micro_tokenizer)
        assert ids[: len(prompt)] == prompt
        assert sample["labels"][len(prompt) - 1] == IGNORE_INDEX and sample["labels"][len(prompt)] != IGNORE_INDEX


def test_packing_keeps_samples_whole_and_restarts_positions():
    samples = [{"input_ids": [n] * n, "labels": [n] * n} for n in (7, 3, 5, 2, 9, 1, 4, 6)]
    rows = pack_samples(samples, max_length=10, seed=0)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert len(rows) == 4  # 37 tokens in bins of 10: best fit decreasing reaches the lower bound
    seen = []
    for row in rows:
        assert sum(row["seq_lens"]) == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        start = 0
        for length in row["seq_lens"]:
            assert row["position_ids"][start:start + length] == list(range(length))
            assert row["input_ids"][start:start + length] == [length] * length
            seen.append(length)
            start += length
    assert sorted(seen) == sorted(len(s["input_ids"]) for s in samples)
    assert pack_samples(samples, 10, seed=0) == rows
    assert [r["seq_lens"] for r in pack_samples(samples, 10, seed=1)] != [r["seq_lens"] for r in rows]


def test_plan_bins_rejects_an_untruncated_sample():
    with pytest.raises(ValueError):
        plan_bins([11], 10)


def write_jsonl(path, rows, bom=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def test_build_dataset_reads_holds_out_packs_and_counts(tmp_path, micro_tokenizer):
    convs = [{"messages": [{"role": "user", "content": f"question {i}"},
                           {"role": "assistant", "content": f"answer number {i}"}]} for i in range(20)]
    train = tmp_path / "train.jsonl"
    write_jsonl(train, convs + [{"messages": [{"role": "user", "content": "no answer"}]}], bom=True)
    cfg = Config.model_validate({"data": {"train": str(train), "eval": 0.25, "max_length": 128, "packing": True,
                                          "system": "Be brief."}})
    data = build_dataset(cfg, micro_tokenizer, shipped("chatml"), cache_root=tmp_path / "cache")
    summary = data.summary
    assert not summary.cached
    assert (summary.conversations, summary.skipped, summary.samples, summary.eval_samples) == (20, 1, 15, 5)
    assert f"{train}:21" in summary.skip_reasons[0]
    assert all(len(r["input_ids"]) <= 128 and "seq_lens" in r for r in data.train)
    assert sum(len(r["seq_lens"]) for r in data.train) == 15 == summary.samples
    assert summary.rows == len(data.train) < 15
    assert "<|im_start|>system\nBe brief.<|im_end|>" in micro_tokenizer.decode(data.eval[0]["input_ids"])
    assert "15 train samples" in data.describe() and "skipped 1" in data.describe()
    again = build_dataset(cfg, micro_tokenizer, shipped("chatml"), cache_root=tmp_path / "cache")
    assert again.summary.cached and "from the cache" in again.describe()
    assert list(again.train) == list(data.train) and list(again.eval) == list(data.eval)
    # the cached rows are exactly what packing the encoded samples in memory gives
    samples = [data.train.samples[i] for i in range(len(data.train.samples))]
    assert list(data.train) == pack_samples(samples, 128, seed=42)
    assert data.train[-1] == data.train[len(data.train) - 1] and data.train[1:3] == [data.train[1], data.train[2]]


def test_cache_is_keyed_by_file_content_and_settings(tmp_path, micro_tokenizer):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    cfg = Config.model_validate({"data": {"train": str(train), "max_length": 64}})
    root = tmp_path / "cache"
    build_dataset(cfg, micro_tokenizer, shipped("chatml"), cache_root=root)
    assert build_dataset(cfg, micro_tokenizer, shipped("chatml"), cache_root=root).summary.cached
    cfg.data.max_length = 32
    assert not build_dataset(cfg, micro_tokenizer, shipped("chatml"), cache_root=root).summary.cached
    assert not build_dataset(cfg, micro_tokenizer, shipped("internlm_chat"), cache_root=root).summary.cached
    write_jsonl(train, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}])
    data = build_dataset(cfg, micro_tokenizer, shipped("internlm_chat"), cache_root=root)
    assert not data.summary.cached
    assert len(list(root.iterdir())) == 4 and not any(p.name.startswith(".") for p in root.iterdir())


def test_build_dataset_eval_file_as_json_array_and_unpacked(tmp_path, micro_tokenizer):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    conv = {"conversation": [{"system": "S", "input": "hi", "output": "hello"}]}
    write_jsonl(train, [conv] * 3)
    test.write_text(json.dumps([conv, conv], indent=4), encoding="utf-8")  # a JSON array despite .jsonl
    cfg = Config.model_validate({"data": {"train": [str(train)], "eval": str(test), "packing": False}})
    data = build_dataset(cfg, micro_tokenizer, shipped("chatml"), cache_root=tmp_path / "cache")
    assert len(data.train) == 3 and len(data.eval) == 2 and "seq_lens" not in data.train[0]


def test_build_dataset_names_the_file_when_nothing_is_usable(tmp_path, micro_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n', encoding="utf-8")
    cfg = Config.model_validate({"data": {"train": str(bad)}})
    with pytest.raises(UserError, match=r"bad.jsonl:1"):
        build_dataset(cfg, micro_tokenizer, shipped("chatml"), cache_root=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # a failed build leaves nothing behind

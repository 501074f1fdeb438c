"""Preference tuning (train.method dpo/orpo/simpo) on builtin:micro, offline on CPU.

The losses are checked against a plain-torch implementation written here from the papers' formulas (one
unpacked forward per answer through transformers' own logits); packed pairs against unpacked; the chunked
log-prob kernel's gradient against autograd through full logits; then whole runs: reward accuracy rises, resume
continues the curve, QLoRA and full fine-tuning run; converters, preview, split and eval of pair files.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lowtune.cli import main
from lowtune.config import Config, LoraSection, TrainSection, load_config
from lowtune.data.dataset import DataSummary, TrainData
from lowtune.data.pairs import convert_pair, make_pair, read_pairs
from lowtune.data.preference import encode_pairs, pair_rows
from lowtune.errors import UserError
from lowtune.kernels.loss import linear_token_logps
from lowtune.models.load import apply_lora, load_model, load_tokenizer
from lowtune.templates import resolve_template
from lowtune.train import train
from lowtune.train.loop import train_step
from lowtune.train.optim import build_scheduler
from lowtune.train.plan import DevicePlan
from lowtune.train.preference import make_pair_batch, pair_loss_sum
from lowtune.train.state import RunState

PLAIN_PLAN = DevicePlan(micro_batch=1, grad_accum=1, checkpointing=False, offload=False, optimizer="adamw",
                        compile=False, attention="sdpa", flat_batches=False)
QUESTIONS = ["What is the capital of France?", "法国的首都是哪里？", "How many legs does a spider have?",
             "一年有几个月？", "What colour is the sky on a clear day?", "水的化学式是什么？",
             "Name a primary colour.", "太阳从哪边升起？"]
SHORT = ["Paris.", "巴黎。", "Eight.", "十二个月。", "Blue.", "H2O。", "Red.", "东边。"]
RAMBLING = ["Well, that is a great question, and there is a lot one could say about it before getting to the point.",
            "这是一个很好的问题，在回答之前，我想先从很多方面慢慢地展开说一说。",
            "Let me think about this carefully and walk you through every step of my reasoning first.",
            "嗯，这个问题其实可以从很多角度来看，我们先聊聊背景再说答案吧。"]


def pair_records(count: int = 16) -> list[dict]:
    """Concise answers chosen over rambling ones; every fourth prompt is a two-turn conversation."""
    records = []
    for i in range(count):
        prompt = [{"role": "user", "content": QUESTIONS[i % 8]}]
        if i % 4 == 3:
            prompt = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, *prompt]
        records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": SHORT[i % 8]}],
                        "rejected": [{"role": "assistant", "content": RAMBLING[i % 4] + " " + SHORT[i % 8]}]})
    return records


def write_pairs_file(path: Path, records: list[dict] | None = None) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records or pair_records()),
                    encoding="utf-8")
    return path


# --- the papers' formulas, in plain torch -----------------------------------------------------------------------

def plain_answer_logps(model, sample: dict) -> tuple[torch.Tensor, int]:
    """(summed log-prob of the answer's trained tokens, their count): one unpacked forward, full logits."""
    labels = torch.tensor(sample["labels"][1:])
    logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1].double()
    trained = labels != -100
    picked = logits.log_softmax(-1)[trained].gather(1, labels[trained][:, None]).squeeze(1)
    return picked.sum(), int(trained.sum())


def paper_loss(method: str, chosen, rejected, ref_chosen, ref_rejected, beta: float, gamma: float = 0.0,
               smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, chosen reward - rejected reward) of one pair; `chosen`/`rejected` = (summed log-prob, tokens)."""
    (pc, nc), (pr, nr) = chosen, rejected
    if method == "dpo":  # Rafailov et al. eq. 7; IPO (Azar et al.) eq. 17; SLiC hinge; cDPO smoothing
        h = (pc - ref_chosen) - (pr - ref_rejected)
        loss = {"sigmoid": -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h),
                "ipo": (h - 1 / (2 * beta)) ** 2, "hinge": torch.relu(1 - beta * h)}[loss_type]
        return loss, beta * h
    avg_c, avg_r = pc / nc, pr / nr
    if method == "simpo":  # Meng et al. eq. 6
        x = beta * avg_c - beta * avg_r - gamma
        return -(1 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x), beta * (avg_c - avg_r)
    # ORPO, Hong et al. eqs. 4-7: odds = P / (1 - P), P = exp(mean log-prob); lambda = beta
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    return -avg_c - beta * F.logsigmoid(log_odds), beta * (avg_c - avg_r)


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(micro_dir):
    return load_tokenizer(micro_dir)


@pytest.fixture(scope="module")
def encoded(micro_dir, tokenizer):
    template = resolve_template("auto", tokenizer, micro_dir)
    pairs = [make_pair(r["prompt"], r["chosen"], r["rejected"]) for r in pair_records(8)]
    samples = encode_pairs(pairs, tokenizer, template, 256)
    assert len(samples) == 8
    return samples


@pytest.fixture(scope="module")
def lora_model(micro_dir):
    torch.manual_seed(0)
    model = apply_lora(load_model(micro_dir, device="cpu"), LoraSection(r=4, alpha=8, dropout=0.0),
                       gradient_checkpointing=False)
    with torch.no_grad():  # non-zero B: the policy differs from the reference (the adapter switched off)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def rows_of(encoded: list, groups: list[list[int]], continuous_positions: bool = False) -> list[dict]:
    """Rows holding the pairs of each group (chosen, rejected, chosen, ...), positions restarting per sample."""
    rows = []
    for group in groups:
        row: dict = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for k in group:
            for sample in encoded[k]:
                row["position_ids"] += range(len(row["input_ids"]), len(row["input_ids"]) + len(sample["input_ids"])) \
                    if continuous_positions else range(len(sample["input_ids"]))
                row["input_ids"] += sample["input_ids"]
                row["labels"] += sample["labels"]
                row["seq_lens"].append(len(sample["input_ids"]))
        rows.append(row)
    return rows


def state_for(model, accelerator, tokenizer, rows, lr: float = 0.0, plan: DevicePlan = PLAIN_PLAN,
              **train_settings) -> RunState:
    """What pair_loss_sum and train_step read: `model` with SGD(lr), `rows` as the training data."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = build_scheduler(optimizer, TrainSection(scheduler="constant", warmup_ratio=0.0), 1)
    cfg = Config.model_validate({"train": {"max_grad_norm": 0.0, **train_settings}})
    return RunState(cfg=cfg, run=None, accelerator=accelerator, plan=plan, steps=None,
                    data=TrainData(rows, [], DataSummary()), tokenizer=tokenizer, template=None, model=model,
                    optimizer=optimizer, scheduler=scheduler)


def lowtune_loss(state: RunState, row_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = make_pair_batch(state, row_indices)
    return pair_loss_sum(state, batch)


# --- the losses -------------------------------------------------------------------------------------------------

METHODS = [("dpo", {}), ("dpo", {"label_smoothing": 0.2}), ("dpo", {"loss_type": "ipo"}),
           ("dpo", {"loss_type": "hinge", "beta": 0.5}), ("simpo", {}), ("simpo", {"label_smoothing": 0.1}),
           ("simpo", {"beta": 2.5, "simpo_gamma": 1.4}), ("orpo", {}), ("orpo", {"beta": 0.5})]


@pytest.fixture(scope="module")
def lora_model64(lora_model):
    """The same policy in fp64: summed log-probs of ~100 tokens carry ~1e-5 of fp32 rounding, so a 1e-5 check of
    the formulas needs the rounding out of the way (lowtune's kernels accumulate fp64 inputs in fp64)."""
    return copy.deepcopy(lora_model).double()


@pytest.mark.parametrize("method, settings", METHODS)
def test_losses_equal_the_papers_formulas(method, settings, micro_dir, lora_model64, accelerator, tokenizer,
                                          encoded):
    from transformers import AutoModelForCausalLM

    lora_model = lora_model64
    reference = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float64).eval()  # a separate copy
    state = state_for(lora_model, accelerator, tokenizer, rows_of(encoded, [[0, 1, 2], [3, 4], [5, 6, 7]]),
                      method=method, **settings)
    beta = settings.get("beta", {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}[method])
    with torch.no_grad():
        mine, sums = lowtune_loss(state, [0, 1, 2])
        expected = []
        for chosen, rejected in encoded:
            ref_c = plain_answer_logps(reference, chosen)[0]
            ref_r = plain_answer_logps(reference, rejected)[0]
            expected.append(paper_loss(method, plain_answer_logps(lora_model, chosen),
                                       plain_answer_logps(lora_model, rejected), ref_c, ref_r, beta,
                                       settings.get("simpo_gamma", 0.5), settings.get("label_smoothing", 0.0),
                                       settings.get("loss_type", "sigmoid")))
    loss = torch.stack([e[0] for e in expected]).mean()
    margins = torch.stack([e[1] for e in expected])
    assert abs(mine.item() / 8 - loss.item()) < 1e-5
    assert abs(sums[3].item() / 8 - margins.mean().item()) < 1e-5  # rewards/margin
    assert sums[2].item() == int((margins > 0).sum())  # rewards/accuracy
    assert 0 < sums[2].item() < 8 or method != "dpo"  # a real mix: the random adapter prefers some of each


def test_packed_pairs_give_the_unpacked_loss(lora_model, accelerator, tokenizer, encoded):
    packed_rows = rows_of(encoded, [[0, 1, 2], [3, 4], [5, 6, 7]])
    single_rows = rows_of(encoded, [[k] for k in range(8)])
    leaky_rows = rows_of(encoded, [[0, 1, 2], [3, 4], [5, 6, 7]], continuous_positions=True)
    with torch.no_grad():
        packed = lowtune_loss(state_for(lora_model, accelerator, tokenizer, packed_rows, method="dpo"), [0, 1, 2])
        single = lowtune_loss(state_for(lora_model, accelerator, tokenizer, single_rows, method="dpo"),
                              list(range(8)))
        one_by_one = [lowtune_loss(state_for(lora_model, accelerator, tokenizer, single_rows, method="dpo"), [k])
                      for k in range(8)]
        leaked = lowtune_loss(state_for(lora_model, accelerator, tokenizer, leaky_rows, method="dpo"), [0, 1, 2])
    for other in (single, (sum(x[0] for x in one_by_one), sum(x[1] for x in one_by_one))):
        assert packed[0].item() == pytest.approx(other[0].item(), abs=1e-5)
        torch.testing.assert_close(packed[1], other[1], atol=1e-5, rtol=1e-5)
    assert abs(leaked[0].item() - packed[0].item()) > 1e-4  # without per-sample attention the test would fail


def test_pair_rows_keep_both_sides_of_a_pair_together():
    rows = pair_rows([30, 50, 20, 70], max_length=40, packing=True, seed=0)
    assert sorted(s for row in rows for s in row) == list(range(8))
    assert all(row[i] % 2 == 0 and row[i + 1] == row[i] + 1 for row in rows for i in range(0, len(row), 2))
    assert len(rows) < 4  # several pairs share a row (capacity 2 x 40 tokens)
    assert pair_rows([30, 50], max_length=40, packing=False, seed=0) == [[0, 1], [2, 3]]


def test_chunked_log_probs_have_the_gradients_of_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = -100
    upstream = torch.randn(2, 9)
    mine = linear_token_logps(hidden, weight, labels, chunk=4)  # several chunks, and rows never projected
    (mine * upstream).sum().backward()
    mine_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = (hidden @ weight.t()).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    full = full.masked_fill(labels == -100, 0.0)
    (full * upstream).sum().backward()
    torch.testing.assert_close(mine, full.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine_grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine_grads[1], weight.grad, atol=1e-5, rtol=1e-5)


def _update(model, accelerator, tokenizer, rows, window):
    """Parameters after one SGD(lr=1) DPO step: the difference from the start is exactly the gradient."""
    model = copy.deepcopy(model).train()
    loss, _, _ = train_step(state_for(model, accelerator, tokenizer, rows, lr=1.0, method="dpo"), window)
    return loss, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_a_step_is_the_mean_over_pairs_whatever_the_micro_batches(lora_model, accelerator, tokenizer, encoded):
    rows = rows_of(encoded, [[0, 1, 2], [3], [4, 5], [6], [7]])
    whole = _update(lora_model, accelerator, tokenizer, rows, [[0, 1, 2, 3, 4]])
    split = _update(lora_model, accelerator, tokenizer, rows, [[0], [1, 2], [3, 4]])
    assert split[0] == pytest.approx(whole[0], rel=1e-5)
    for a, b in zip(whole[1], split[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# --- whole runs -------------------------------------------------------------------------------------------------

def write_config(tmp_path: Path, name: str = "run", **sections) -> Path:
    pairs = write_pairs_file(tmp_path / "pairs.jsonl")
    tree = {
        "model": {"path": "builtin:micro", "quantization": "none"},
        "data": {"train": [str(pairs)], "max_length": 96, "packing": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"method": "dpo", "max_steps": 8, "batch_size": 2, "grad_accum": 2, "lr": 1.0e-2,
                  "warmup_ratio": 0.0, "save_every": 4, "save_limit": 2, "log_every": 1},
        "eval": {"every": 4, "prompts": ["What is the capital of France?"], "max_new_tokens": 4},
        "log": {"to": []},
        "output": {"dir": str(tmp_path / name)},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> Path:
    """A LoRA DPO run on builtin:micro over the 16 training pairs (8 steps), with 4 pairs held out."""
    tmp = tmp_path_factory.mktemp("dpo")
    train(load_config(str(write_config(tmp, data={"eval": 0.25}))))
    return tmp / "run"


def test_dpo_raises_reward_accuracy_on_its_training_pairs(dpo_run):
    steps = [row for row in metrics(dpo_run) if "loss" in row]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the reference: ties
    assert steps[0]["rewards/accuracy"] == 0.0
    assert all(row["rewards/accuracy"] == 1.0 for row in steps[-3:])
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"] and steps[-1]["rewards/margin"] > 0
    evals = [row for row in metrics(dpo_run) if "eval_loss" in row]
    assert [row["step"] for row in evals] == [0, 4, 8] and evals[-1]["eval_rewards/accuracy"] >= 0.75
    assert (dpo_run / "adapter" / "adapter_config.json").is_file()
    assert [json.loads(line)["step"] for line in (dpo_run / "samples.jsonl").read_text().splitlines()] == [0, 4, 8]
    assert load_config(str(dpo_run / "config.yaml")).train.method == "dpo"


def test_eval_reports_reward_accuracy_on_pairs(dpo_run, capsys):
    from lowtune.infer.engine import load_engine
    from lowtune.infer.evaluate import evaluate

    pairs = dpo_run.parent / "pairs.jsonl"
    report = evaluate(load_engine(str(dpo_run)), str(pairs), n_samples=2)
    assert report.pairs == 16 and report.metrics["reward_accuracy"]["rate"] >= 0.9
    assert report.metrics["reward_margin"] > 0
    assert report.metrics["chosen_preferred"]["rate"] > report.base_metrics["chosen_preferred"]["rate"]
    assert "reward_accuracy" not in report.base_metrics  # the base's own DPO reward is 0 by definition
    assert len(report.samples) == 2 and report.samples[0].reference == SHORT[0]
    assert main(["eval", str(dpo_run), "--data", str(pairs), "-n", "1", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "reward accuracy" in out and "chosen preferred" in out
    saved = json.loads((dpo_run / "eval.json").read_text(encoding="utf-8"))
    assert saved["pairs"] == 16 and saved["metrics"]["reward_accuracy"]["of"] == 16


def test_resume_continues_the_dpo_curve(tmp_path, monkeypatch):
    import lowtune.train.loop as loop

    whole = tmp_path / "whole"
    whole.mkdir()
    train(load_config(str(write_config(whole))))
    expected = [row for row in metrics(whole / "run") if "loss" in row]

    broken = tmp_path / "broken"
    broken.mkdir()
    config = write_config(broken)
    save = loop.save_checkpoint

    def crash_after_step_4(state, step):
        path = save(state, step)
        if step == 4:
            raise RuntimeError("killed")
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        train(load_config(str(config)))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    train(load_config(str(config)), resume="auto")
    resumed = [row for row in metrics(broken / "run") if "loss" in row]
    assert [row["step"] for row in resumed] == list(range(1, 9))
    for mine, theirs in zip(resumed, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["rewards/margin"] == pytest.approx(theirs["rewards/margin"], abs=1e-5)


def test_qlora_dpo_runs_on_a_4bit_base(tmp_path):
    import bitsandbytes as bnb

    result = train(load_config(str(write_config(tmp_path, model={"quantization": "nf4"},
                                                train={"max_steps": 3}, eval={"prompts": []}))))
    assert isinstance(result.model.get_base_model().model.layers[0].mlp.down_proj.base_layer,
                      bnb.nn.Linear4bit)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5) and result.losses[-1] < result.losses[0]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_full_fine_tuning_dpo_uses_precomputed_reference_log_probs(tmp_path):
    result = train(load_config(str(write_config(tmp_path, lora={"enabled": False}, train={"max_steps": 3,
                                                                                          "lr": 1.0e-3},
                                                eval={"prompts": []}))))
    steps = [row for row in metrics(tmp_path / "run") if "loss" in row]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    assert steps[-1]["rewards/margin"] > 0 and result.losses[-1] < result.losses[0]
    assert (tmp_path / "run" / "model" / "config.json").is_file()

    from lowtune.infer.engine import load_engine
    from lowtune.infer.evaluate import evaluate

    # eval has no adapter to switch off: the run's base is loaded beside it as the reference
    report = evaluate(load_engine(str(tmp_path / "run")), str(tmp_path / "pairs.jsonl"), n_samples=1,
                      with_base=False)
    assert report.pairs == 16 and report.metrics["reward_accuracy"]["of"] == 16
    assert report.metrics["reward_margin"] > 0


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_train(tmp_path, method):
    result = train(load_config(str(write_config(tmp_path, train={"method": method, "max_steps": 4},
                                                eval={"prompts": []}))))
    steps = [row for row in metrics(tmp_path / "run") if "loss" in row]
    assert result.losses[-1] < result.losses[0] and steps[-1]["rewards/margin"] > steps[0]["rewards/margin"]


# --- data -------------------------------------------------------------------------------------------------------

def test_converters_give_the_canonical_pair():
    expected = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5, I think"}]}
    records = {
        "pairs": {"prompt": "2+2?", "chosen": "4", "rejected": "5, I think"},
        "ultrafeedback": {"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"},
                                                       {"role": "assistant", "content": "4"}],
                          "rejected": [{"role": "user", "content": "2+2?"},
                                       {"role": "assistant", "content": "5, I think"}],
                          "messages": [], "score_chosen": 9.0, "score_rejected": 2.0},
        "hh-rlhf": {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
                    "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5, I think"},
        "sharegpt-pairs": {"conversations": [{"from": "human", "value": "2+2?"}],
                           "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5, I think"}},
    }
    for layout, record in records.items():
        assert convert_pair(record) == (layout, expected), layout
    multi = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 5, I think"}
    pair = convert_pair(multi)[1]
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"] and pair["chosen"] == expected["chosen"]
    system = {**records["sharegpt-pairs"], "system": "Be brief."}
    assert convert_pair(system)[1]["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_convert_reports_skipped_pairs_by_line(tmp_path, capsys):
    src = tmp_path / "hh.jsonl"
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    lines = [good, {"chosen": "\n\nHuman: Hi\n\nAssistant: Same", "rejected": "\n\nHuman: Hi\n\nAssistant: Same"},
             {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
             {"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{not json\n", encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "convert", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 pairs from 5 records" in printed and "skipped 4" in printed
    assert f"{src}:2: chosen and rejected are the same conversation" in printed
    assert f"{src}:3: 'chosen' message 1 is empty" in printed
    assert f"{src}:4: 'chosen' message 1 must be an assistant message" in printed
    assert f"{src}:5: bad JSON" in printed and "wrote" in printed and "(1 pairs)" in printed
    assert [json.loads(x) for x in out.read_text().splitlines()] == [convert_pair(good)[1]]
    assert main(["data", "convert", str(src), "-o", str(out), "--strict"]) == 2
    assert f"{src}:2:" in capsys.readouterr().err
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "x.jsonl"), "--format", "sharegpt-pairs"]) == 2
    assert "no preference pair could be converted" in capsys.readouterr().err


def test_preview_shows_both_sides_with_their_trained_spans(tmp_path, capsys):
    src = write_pairs_file(tmp_path / "pairs.jsonl", pair_records(4)[3:])
    assert main(["data", "preview", str(src), "--model", "builtin:micro", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert f"{src}:1 chosen" in out and f"{src}:1 rejected" in out
    assert f"⟦{SHORT[3]}<|im_end|>⟧" in out and f"⟦{RAMBLING[3]} {SHORT[3]}<|im_end|>⟧" in out
    assert "Hello.<|im_end|>" in out and "⟦Hello." not in out  # an answer inside the prompt is context


def test_split_keeps_pairs_whole(tmp_path):
    src = write_pairs_file(tmp_path / "pairs.jsonl")
    assert main(["data", "split", str(src), "--train", "0.75"]) == 0
    train_pairs = [p for _, p in read_pairs(tmp_path / "pairs.train.jsonl")]
    test_pairs = [p for _, p in read_pairs(tmp_path / "pairs.test.jsonl")]
    assert (len(train_pairs), len(test_pairs)) == (12, 4)


def test_data_of_the_wrong_kind_is_refused_with_the_fix(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="no usable preference pair .* first problem: .*not a preference pair"):
        train(load_config(str(write_config(tmp_path, data={"train": [str(sft)]}))))
    with pytest.raises(UserError, match=r"data.eval: no preference pair in .*sft.jsonl; first problem: .*:1: "):
        train(load_config(str(write_config(tmp_path, name="eval", data={"eval": str(sft)}))))
    with pytest.raises(UserError, match="train it with train.method=dpo"):
        train(load_config(str(write_config(tmp_path, name="sft", train={"method": "sft"}))))


@pytest.mark.parametrize("overrides, message", [
    (["train.beta=0.1"], "train.beta, train.label_smoothing and train.loss_type apply to preference tuning"),
    (["train.method=orpo", "train.loss_type=ipo"], "train.loss_type=ipo is a DPO variant"),
    (["train.method=orpo", "train.label_smoothing=0.1"], "train.label_smoothing applies to dpo"),
    (["train.method=dpo", "train.loss_type=hinge", "train.label_smoothing=0.1"], "not to dpo loss_type=hinge"),
    (["train.method=dpo", "data.replay=0.5"], "data.replay adds plain conversations"),
    (["train.method=simpo", "model.quantization=none", "train.distributed=fsdp"], "does not run sharded yet"),
    (["train.method=kto"], "train.method must be 'sft', 'dpo', 'orpo' or 'simpo'"),
    (["train.method=dpo", "train.label_smoothing=0.5"], "train.label_smoothing"),
])
def test_impossible_combinations_fail_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as caught:
        load_config("tiny-self", overrides)
    assert "\n" not in str(caught.value)


def test_recipes_are_listed_with_their_command(capsys):
    assert main(["list", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "internlm-chat-7b-qlora-dpo" in out and "tiny-dpo" in out
    big, tiny = load_config("internlm-chat-7b-qlora-dpo"), load_config("tiny-dpo")
    assert (big.train.method, big.model.quantization, big.lora.enabled) == ("dpo", "nf4", True)
    assert tiny.train.method == "dpo" and tiny.data.train == ["builtin:concise"]
    pairs = list(read_pairs("builtin:concise"))
    assert 100 <= len(pairs) <= 200
    assert any("\u4e00" <= p["prompt"][-1]["content"][0] <= "\u9fff" for _, p in pairs)  # zh and en

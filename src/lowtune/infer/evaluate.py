"""`lowtune eval`: how a tuned model compares with its base, on a test split and on built-in probes.

- Loss and perplexity of a test split. The conversations are read and encoded exactly as training reads its data
  (same converters, default system prompt, template label masks, max_length), so the loss is comparable with the
  training curve: summed cross-entropy over every trained (answer + end-of-turn) token, divided by their count.
- ROUGE-L F1 and corpus BLEU-4 of the model's answers against the split's references (greedy). Chinese is scored
  by character and other scripts by lower-cased word, so both read the same way in a mixed split.
- `identity`: the share of held-out identity questions (`data.probes.IDENTITY_PROBES`, none of them in the
  training file `data identity` writes) whose answer gives the name.
- `retention`: on the built-in factual probes, the share of key facts the base model gives that the tuned model
  still gives (knowledge accuracy is reported beside it).
- Preference pairs (a --data file of {"prompt", "chosen", "rejected"} lines, or any pair layout `data convert`
  reads): reward accuracy, the share of held-out pairs whose implicit reward (the run's train.method: DPO's
  log-ratio against the base, SimPO's and ORPO's mean log-prob) ranks the chosen answer above the rejected one,
  with the mean reward margin; and, for tuned and base alike, the share of pairs whose chosen answer has the higher
  mean per-token log-probability. Answers to the prompts are scored against the chosen answers.

Every measure is taken for the tuned model and, when it has an adapter, for its base: the same weights with the
adapter disabled, so one model is in memory.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lowtune.data.collate import collate, target_count
from lowtune.data.dataset import encode_all, iter_sources
from lowtune.data.formats import ReadReport
from lowtune.data.pairs import is_pair_file, pair_conversations, read_pairs
from lowtune.data.preference import encode_pairs, pair_batch
from lowtune.errors import UserError
from lowtune.generation import Sampling
from lowtune.infer.engine import ChatEngine
from lowtune.runs import RunFolder, atomic_write_text, close_name_hint, is_run_folder, missing_folder

TOKENS_PER_BATCH = 4096
"""Padded tokens per forward pass: bounds the fp32 logits (tokens × vocab) kept for the loss."""
WORDS = re.compile(r"[\u4e00-\u9fff]|[A-Za-z0-9]+")


PROBE_TOKENS = 64
"""Answer length for probes: a name or a key fact comes early in an answer."""


@dataclass
class Sample:
    question: str
    reference: str
    answer: str
    base_answer: str | None = None


@dataclass
class ProbeResult:
    kind: str
    """identity | knowledge"""
    question: str
    expected: str
    """The name, or the accepted key facts joined by '|'."""
    answer: str
    ok: bool
    base_answer: str | None = None
    base_ok: bool | None = None


@dataclass
class EvalReport:
    data: str | None = None
    conversations: int = 0
    pairs: int = 0
    """Preference pairs scored (a pair file as --data)."""
    tokens: int = 0
    """Trained tokens the loss is averaged over."""
    loss: float | None = None
    perplexity: float | None = None
    base_loss: float | None = None
    base_perplexity: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """The tuned model's measures (the model's own when it has no adapter)."""
    base_metrics: dict[str, Any] = field(default_factory=dict)
    """The same measures with the adapter disabled."""
    samples: list[Sample] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    max_length: int | None = None
    seconds: float = 0.0

    @property
    def has_base(self) -> bool:
        return self.base_loss is not None or bool(self.base_metrics)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n"


# --- loss ---------------------------------------------------------------------------------------------------------

def _batches(rows: list[dict], budget: int = TOKENS_PER_BATCH) -> list[list[dict]]:
    """Rows grouped by similar length so that padded size stays under `budget` (at least one row each)."""
    batches: list[list[dict]] = []
    current: list[dict] = []
    for row in sorted(rows, key=lambda r: len(r["input_ids"])):
        width = len(row["input_ids"])
        if current and width * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def loss_sum(model: Any, rows: list[dict], pad_id: int, budget: int = TOKENS_PER_BATCH) -> tuple[float, int]:
    """(sum of per-token cross-entropy, number of trained tokens) over `rows`, padded batches of `budget` tokens:
    the batches and the summed loss of training (data/collate.py, kernels.causal_lm_loss_sum)."""
    import torch

    from lowtune.kernels import causal_lm_loss_sum  # imports torch: only when a loss is computed

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for rows_of_batch in _batches(rows, budget):
        batch = {k: v.to(device) for k, v in collate(rows_of_batch, pad_id).items()}
        with torch.inference_mode():
            total += causal_lm_loss_sum(model, batch, "logits").item()
        count += target_count(batch)
    return total, count


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# --- answers and text metrics -------------------------------------------------------------------------------------

def answerable(conversations: list[list[dict]], n: int) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference) for the first `n` conversations whose last answer follows a user turn."""
    pairs = []
    for messages in conversations:
        if len(pairs) >= n:
            break
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last >= 1 and messages[last - 1]["role"] == "user":
            pairs.append((messages[:last], messages[last]["content"]))
    return pairs


def sample_answers(engine: ChatEngine, conversations: list[list[dict]], n: int, sampling: Sampling,
                   with_base: bool = True) -> list[Sample]:
    """Answers to the first `n` answerable conversations (and the base model's, when there is an adapter)."""
    pairs = answerable(conversations, n)
    prompts = [prompt for prompt, _ in pairs]
    answers = engine.answer_many(prompts, sampling)
    base = engine.answer_many(prompts, sampling, adapter=False) if with_base and engine.has_adapter else None
    return [Sample(question=prompt[-1]["content"], reference=reference, answer=answer,
                   base_answer=base[i] if base else None)
            for i, ((prompt, reference), answer) in enumerate(zip(pairs, answers))]


def words(text: str) -> list[str]:
    """Chinese characters one by one, other scripts as lower-cased words; punctuation dropped."""
    return [w.lower() for w in WORDS.findall(text)]


def text_metrics(answers: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (whitespace-normalised), mean ROUGE-L F1 and corpus BLEU-4, on the same word split."""
    if not answers:
        return {}
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    class Words:  # rouge_score's own tokenizer drops CJK characters
        def tokenize(self, text: str) -> list[str]:
            return words(text)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words())
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    bleu = BLEU(tokenize="none", max_ngram_order=4).corpus_score(
        [" ".join(words(a)) for a in answers], [[" ".join(words(r)) for r in references]])
    exact = [" ".join(a.split()) == " ".join(r.split()) for a, r in zip(answers, references)]
    return {"exact_match": sum(exact) / len(exact), "rouge_l": sum(rouge) / len(rouge), "bleu_4": bleu.score / 100}


# --- probes -------------------------------------------------------------------------------------------------------

def identity_probes(engine: ChatEngine, name: str, with_base: bool = True) -> list[ProbeResult]:
    """Every held-out identity question (zh and en): does the answer give `name`?"""
    from lowtune.data.probes import IDENTITY_PROBES, names_identity

    questions = [q for lang in ("en", "zh") for q in IDENTITY_PROBES[lang]]
    tuned, base = _probe_answers(engine, questions, with_base)
    return [ProbeResult("identity", q, name, a, names_identity(a, name),
                        b, None if b is None else names_identity(b, name))
            for q, a, b in zip(questions, tuned, base)]


def knowledge_probes(engine: ChatEngine, with_base: bool = True) -> list[ProbeResult]:
    """Every factual probe: does the answer give its key fact?"""
    from lowtune.data.probes import KNOWLEDGE_PROBES, keeps_fact

    tuned, base = _probe_answers(engine, [p.question for p in KNOWLEDGE_PROBES], with_base)
    return [ProbeResult("knowledge", p.question, "|".join(p.facts), a, keeps_fact(a, p),
                        b, None if b is None else keeps_fact(b, p))
            for p, a, b in zip(KNOWLEDGE_PROBES, tuned, base)]


def _probe_answers(engine: ChatEngine, questions: list[str], with_base: bool) -> tuple[list[str], list]:
    prompts = [[{"role": "user", "content": q}] for q in questions]
    sampling = Sampling(max_new_tokens=PROBE_TOKENS)
    tuned = engine.answer_many(prompts, sampling)
    base = engine.answer_many(prompts, sampling, adapter=False) if with_base else [None] * len(questions)
    return tuned, base


def probe_metrics(probes: list[ProbeResult]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tuned, base) measures: identity hit rate, knowledge accuracy and retention, with their counts."""
    tuned: dict[str, Any] = {}
    base: dict[str, Any] = {}
    for kind, key in (("identity", "identity_hit_rate"), ("knowledge", "knowledge_accuracy")):
        rows = [p for p in probes if p.kind == kind]
        if rows:
            tuned[key] = _rate(sum(p.ok for p in rows), len(rows))
            if rows[0].base_ok is not None:
                base[key] = _rate(sum(bool(p.base_ok) for p in rows), len(rows))
    known = [p for p in probes if p.kind == "knowledge" and p.base_ok]
    if known:
        tuned["retention"] = _rate(sum(p.ok for p in known), len(known))
    return tuned, base


def _rate(hits: int, total: int) -> dict[str, Any]:
    return {"rate": hits / total, "hits": hits, "of": total}


# --- the command --------------------------------------------------------------------------------------------------

def evaluate(engine: ChatEngine, data: str | None, n_samples: int = 50, sampling: Sampling | None = None,
             max_length: int | None = None, with_base: bool = True, identity: str | None = None,
             retention: bool = False) -> EvalReport:
    """Measure `engine` (and its base, when it has an adapter and `with_base`) on `data` and the chosen probes."""
    started = time.perf_counter()
    if data is None and identity is None and not retention:
        raise UserError("nothing to evaluate: give --data FILE (a test split), --identity NAME and/or --retention")
    if retention and not engine.has_adapter:
        raise UserError("--retention compares the tuned model with its base, which is the same model with the "
                        "adapter off: give a LoRA/QLoRA run or --adapter PATH")
    with_base = with_base and engine.has_adapter
    report = EvalReport()
    if data is not None and is_pair_file(data):
        _score_pairs(engine, data, n_samples, sampling or Sampling(max_new_tokens=256), max_length, with_base,
                     report)
    elif data is not None:
        _score_split(engine, data, n_samples, sampling or Sampling(max_new_tokens=256), max_length, with_base,
                     report)
    if identity is not None:
        report.probes += identity_probes(engine, identity, with_base)
    if retention:
        report.probes += knowledge_probes(engine, with_base=True)
    tuned, base = probe_metrics(report.probes)
    report.metrics.update(tuned)
    report.base_metrics.update(base)
    report.seconds = time.perf_counter() - started
    return report


def _score_split(engine: ChatEngine, data: str, n_samples: int, sampling: Sampling, max_length: int | None,
                 with_base: bool, report: EvalReport) -> None:
    """Loss of every conversation in `data`; answers to the first `n_samples` beside their references."""
    if not Path(data).exists():
        raise UserError(f"--data {data}: file not found")
    config = engine.config
    fmt = config.data.format if config else "auto"
    max_length = max_length or (config.data.max_length if config else None)
    read = ReadReport()
    conversations = list(iter_sources([data], fmt, engine.default_system, read))
    rows = encode_all(conversations, engine.tokenizer, engine.template, max_length)
    if not rows:
        raise UserError(f"--data {data}: no conversation with an assistant answer to score"
                        + (f" ({read.describe()})" if read.skipped else ""))
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else engine.all_stop_ids()[0]
    total, count = loss_sum(engine.model, rows, pad_id)
    report.data, report.conversations, report.tokens, report.max_length = str(data), len(rows), count, max_length
    report.loss, report.perplexity = total / count, _perplexity(total / count)
    if with_base:
        with engine.without_adapter():
            base_total, _ = loss_sum(engine.model, rows, pad_id)
        report.base_loss, report.base_perplexity = base_total / count, _perplexity(base_total / count)
    report.samples = sample_answers(engine, conversations, n_samples, sampling, with_base)
    references = [s.reference for s in report.samples]
    report.metrics.update(text_metrics([s.answer for s in report.samples], references))
    if with_base and report.samples:
        report.base_metrics.update(text_metrics([s.base_answer or "" for s in report.samples], references))


# --- preference pairs ---------------------------------------------------------------------------------------------

def pair_logps(model: Any, encoded: list[tuple[dict, dict]], pad_id: int,
               budget: int = TOKENS_PER_BATCH) -> tuple[Any, Any]:
    """(summed log-prob of each answer's trained tokens, their count), interleaved chosen/rejected per pair; each
    pair is one row (both sides, per-sample attention), rows batched in order up to `budget` padded tokens."""
    import torch

    from lowtune.kernels.preference import sequence_logps  # imports torch: only when pairs are scored

    rows = [{"input_ids": c["input_ids"] + r["input_ids"], "labels": c["labels"] + r["labels"],
             "position_ids": [*range(len(c["input_ids"])), *range(len(r["input_ids"]))],
             "seq_lens": [len(c["input_ids"]), len(r["input_ids"])]} for c, r in encoded]
    device = next(model.parameters()).device
    sums, tokens, start = [], [], 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and max(len(r["input_ids"]) for r in rows[start:end + 1]) * (end + 1 - start) <= budget:
            end += 1
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in pair_batch(rows[start:end], pad_id).items()}
        with torch.inference_mode():
            batch_sums, batch_tokens = sequence_logps(model, batch, "logits")
        sums.append(batch_sums.cpu())
        tokens.append(batch_tokens.cpu())
        start = end
    return torch.cat(sums), torch.cat(tokens)


def _reference_logps(engine: ChatEngine, encoded: list[tuple[dict, dict]], pad_id: int) -> Any:
    """Log-probs under the base: the adapter switched off, or for a full fine-tune its base loaded beside it."""
    if engine.has_adapter:
        with engine.without_adapter():
            return pair_logps(engine.model, encoded, pad_id)
    config = engine.config
    if config is None or config.train.method == "sft":
        return None
    from lowtune.infer.engine import load_base
    from lowtune.models.resolve import resolve_model_dir

    base_dir = resolve_model_dir(config.model.path, config.model.hub, config.model.revision,
                                 config.model.trust_remote_code)
    return pair_logps(load_base(base_dir, trust_remote_code=config.model.trust_remote_code), encoded, pad_id)


def pair_metrics(tuned: tuple[Any, Any], base: tuple[Any, Any] | None, settings: Any) -> tuple[dict, dict]:
    """(tuned, base) measures of scored pairs: reward accuracy and margin under `settings` (DPO's need `base`),
    and the share of pairs whose chosen answer has the higher mean log-prob."""
    from lowtune.kernels.preference import preference_terms

    def chosen_preferred(logps: tuple[Any, Any]) -> dict:
        means = logps[0] / logps[1].clamp(min=1)
        return _rate(int((means[0::2] > means[1::2]).sum()), len(means) // 2)

    def rewards(logps: tuple[Any, Any], reference: Any) -> dict:
        terms = preference_terms(logps[0], logps[1], settings, reference)
        margin = terms.chosen_rewards - terms.rejected_rewards
        return {"reward_accuracy": _rate(int((margin > 0).sum()), len(margin)),
                "reward_margin": float(margin.mean())}

    tuned_metrics, base_metrics = {"chosen_preferred": chosen_preferred(tuned)}, {}
    if base is not None:
        base_metrics["chosen_preferred"] = chosen_preferred(base)
    if not settings.needs_reference:
        tuned_metrics.update(rewards(tuned, None))
        if base is not None:
            base_metrics.update(rewards(base, None))
    elif base is not None:
        tuned_metrics.update(rewards(tuned, base[0]))  # the base's own DPO reward is 0 by definition: no column
    return tuned_metrics, base_metrics


def _score_pairs(engine: ChatEngine, data: str, n_samples: int, sampling: Sampling, max_length: int | None,
                 with_base: bool, report: EvalReport) -> None:
    """Reward accuracy of the pairs in `data`; answers to the first `n_samples` prompts beside the chosen ones."""
    from lowtune.kernels.preference import PreferenceSettings

    config = engine.config
    max_length = max_length or (config.data.max_length if config else None)
    read = ReadReport(unit="pairs")
    pairs = [pair for _, pair in read_pairs(data, "auto", read, engine.default_system)]
    encoded = encode_pairs(pairs, engine.tokenizer, engine.template, max_length)
    if not encoded:
        raise UserError(f"--data {data}: no preference pair to score" + (f" ({read.describe()})" if read.skipped
                                                                          else ""))
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else engine.all_stop_ids()[0]
    method = config.train if config and config.train.method != "sft" else None
    settings = PreferenceSettings.from_train(method) if method else PreferenceSettings("dpo", 0.1)
    tuned = pair_logps(engine.model, encoded, pad_id)
    base = _reference_logps(engine, encoded, pad_id) if with_base or settings.needs_reference else None
    tuned_metrics, base_metrics = pair_metrics(tuned, base, settings)
    report.data, report.pairs, report.max_length = str(data), len(encoded), max_length
    report.metrics.update(tuned_metrics)
    if with_base:
        report.base_metrics.update(base_metrics)
    report.samples = sample_answers(engine, [pair_conversations(p)[0] for p in pairs], n_samples, sampling,
                                    with_base)
    references = [s.reference for s in report.samples]
    report.metrics.update(text_metrics([s.answer for s in report.samples], references))
    if with_base and report.samples:
        report.base_metrics.update(text_metrics([s.base_answer or "" for s in report.samples], references))


def eval_output_path(target: str, output: str | None) -> Path:
    """-o, else eval.json in the run folder; a model folder needs -o."""
    if output:
        return Path(output)
    if is_run_folder(Path(target)):
        return RunFolder(Path(target)).eval_path
    if not Path(target).exists() and close_name_hint(Path(target)):
        raise missing_folder(Path(target))
    raise UserError(f"{target} is not a run folder, so there is no place for eval.json; give -o FILE")


def write_report(report: EvalReport, path: Path) -> None:
    atomic_write_text(path, report.to_json())


LABELS = {"reward_accuracy": "reward accuracy", "reward_margin": "reward margin",
          "chosen_preferred": "chosen preferred (mean log-prob)",
          "exact_match": "exact match", "rouge_l": "ROUGE-L", "bleu_4": "BLEU-4",
          "identity_hit_rate": "identity hit rate", "knowledge_accuracy": "knowledge accuracy",
          "retention": "retention (base facts kept)"}


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # a rate with its counts
        return f"{value['rate']:.1%} ({value['hits']}/{value['of']})"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_rows(report: EvalReport) -> list[tuple[str, str, str]]:
    """(measure, tuned, base) rows of the console table, in reading order."""
    rows = []
    if report.loss is not None:
        rows += [("loss", _shown(report.loss), _shown(report.base_loss)),
                 ("perplexity", _shown(report.perplexity), _shown(report.base_perplexity)),
                 ("conversations / tokens", f"{report.conversations} / {report.tokens}", "")]
    if report.pairs:
        rows.append(("pairs", str(report.pairs), ""))
    for key, label in LABELS.items():
        if key in report.metrics:
            rows.append((label, _shown(report.metrics[key]), _shown(report.base_metrics.get(key))))
    return rows


def show_report(report: EvalReport, path: Path, out: TextIO | None = None, width: int = 300, shown: int = 5) -> None:
    """A before/after table, `shown` sample answers beside their references, and every probe the tuned model
    missed (question, base answer, tuned answer)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=out)
    summary = Table(title=f"eval of {escape(report.data or 'probes')}", show_header=True)
    summary.add_column("")
    summary.add_column("fine-tuned" if report.has_base else "model", justify="right")
    if report.has_base:
        summary.add_column("base", justify="right")
    for label, tuned, base in summary_rows(report):
        summary.add_row(label, tuned, *([base] if report.has_base else []))
    console.print(summary)
    if report.samples and shown:
        table = Table(title="sample answers", show_lines=True, expand=True)
        columns = ("#", "question", "reference", "answer") + (("base answer",) if report.has_base else ())
        for name in columns:
            table.add_column(name, overflow="fold", ratio=None if name == "#" else 1)
        for i, s in enumerate(report.samples[:shown], 1):
            texts = (s.question, s.reference, s.answer) + ((s.base_answer or "",) if report.has_base else ())
            table.add_row(str(i), *(escape(text[:width]) for text in texts))
        console.print(table)
    for line in missed_probes(report):
        console.print(escape(line), soft_wrap=True)
    console.print(f"wrote {escape(str(path))} ({report.seconds:.1f}s)")


def missed_probes(report: EvalReport, width: int = 160) -> list[str]:
    """One line per identity question without the name, and per key fact the base gave and the tuned model lost."""
    def clip(text: str | None) -> str:
        return " ".join((text or "").split())[:width]

    lines = []
    for p in report.probes:
        if p.kind == "identity" and not p.ok:
            lines.append(f"identity miss: {p.question!r} -> {clip(p.answer)!r} (no '{p.expected}')")
        elif p.kind == "knowledge" and p.base_ok and not p.ok:
            lines.append(f"knowledge lost: {p.question!r} base {clip(p.base_answer)!r} -> tuned {clip(p.answer)!r} "
                         f"(expected {p.expected})")
    return lines

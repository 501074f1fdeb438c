"""Preference pairs: the canonical record, converters from the common public layouts, reading and writing.

Layer 1. Canonical line (JSONL): `{"prompt": [...messages], "chosen": [...], "rejected": [...]}`: the prompt ends
with a user message; chosen and rejected are the two answers to it (assistant messages). Converters:

- `pairs`: the canonical form; `prompt`, `chosen` and `rejected` may also be plain strings (TRL's standard form).
- `ultrafeedback`: chosen and rejected are whole conversations that share the prompt (UltraFeedback-binarized, TRL's
  implicit-prompt form): the shared leading messages are the prompt.
- `hh-rlhf`: chosen and rejected are "\\n\\nHuman: ... \\n\\nAssistant: ..." strings (Anthropic HH-RLHF).
- `sharegpt-pairs`: `conversations` of {from, value} turns, with `chosen` and `rejected` answers (LLaMA-Factory).

A record that cannot be converted is skipped with a reason naming `file:line`, counted in the ReadReport as the
SFT readers do. `builtin:NAME` names a pair set shipped in lowtune/assets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from lowtune.data.formats import SHAREGPT_ROLES, iter_records
from lowtune.data.messages import ReadReport, SkipRecord, add_system, normalize_messages
from lowtune.errors import UserError
from lowtune.runs import atomic_file

PAIR_FORMATS = ("pairs", "ultrafeedback", "hh-rlhf", "sharegpt-pairs")
BUILTIN_PAIRS = {"concise": "concise_pairs.jsonl"}
"""`builtin:concise`: concise vs rambling answers to everyday questions, zh + en (written for lowtune)."""
BUILTIN_PREFIX = "builtin:"
HH_TURN = re.compile(r"\n\nHuman:|\n\nAssistant:")


def builtin_pairs_path(spec: str) -> Path | None:
    """The shipped file of `builtin:NAME`, or None when `spec` does not name one."""
    if not spec.startswith(BUILTIN_PREFIX):
        return None
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_PAIRS:
        raise UserError(f"no built-in preference set '{spec}'; choose one of: "
                        f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_PAIRS)}")
    return Path(str(resources.files("lowtune") / "assets" / BUILTIN_PAIRS[name]))


def pair_source(spec: str | Path) -> Path:
    """The file behind a data path: a `builtin:NAME` set, or the path itself."""
    return builtin_pairs_path(str(spec)) or Path(spec)


def is_pair_file(spec: str | Path) -> bool:
    """Whether a data file holds preference pairs, judged by its first record."""
    path = pair_source(spec)
    if not path.exists():
        return False
    for _, record in iter_records(path):
        return isinstance(record, dict) and "chosen" in record and "rejected" in record
    return False


# --- the canonical pair -------------------------------------------------------------------------------------------

def _answer(value: Any, side: str) -> list[dict]:
    """A side of a pair: a string, one message, or a list of assistant messages."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SkipRecord(f"'{side}' must be a non-empty list of assistant messages or a string")
    answer = []
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            raise SkipRecord(f"'{side}' message {n} must be an assistant message")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise SkipRecord(f"'{side}' message {n} is empty")
        answer.append({"role": "assistant", "content": content})
    return answer


def make_pair(prompt: Any, chosen: Any, rejected: Any) -> dict:
    """A validated canonical pair; the prompt follows the SFT rules (normalize_messages) and ends with a user turn."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise SkipRecord("'prompt' must be a non-empty list of messages or a string")
    chosen_answer, rejected_answer = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    if chosen_answer == rejected_answer:
        raise SkipRecord("chosen and rejected are the same answer")
    whole = normalize_messages(prompt + chosen_answer)  # leading answers dropped, user turns joined, roles checked
    prompt_messages = whole[:len(whole) - len(chosen_answer)]
    if not prompt_messages or prompt_messages[-1]["role"] != "user":
        raise SkipRecord("the prompt must end with a user message")
    return {"prompt": prompt_messages, "chosen": chosen_answer, "rejected": rejected_answer}


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> dict:
    """Two whole conversations -> a pair: their shared leading messages are the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) or shared == len(rejected):
        raise SkipRecord("chosen and rejected are the same conversation" if len(chosen) == len(rejected)
                         else "one side is a prefix of the other: no second answer to compare")
    return make_pair(chosen[:shared], chosen[shared:], rejected[shared:])


def _plain(messages: Any, side: str) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise SkipRecord(f"'{side}' must be a list of {{role, content}} messages")
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


# --- converters ---------------------------------------------------------------------------------------------------

def from_pairs(record: dict) -> dict:
    if "prompt" not in record:
        raise SkipRecord("a pair needs 'prompt' beside 'chosen' and 'rejected'")
    return make_pair(record["prompt"], record["chosen"], record["rejected"])


def from_ultrafeedback(record: dict) -> dict:
    """chosen/rejected = whole conversations [{role, content}, ...] sharing the prompt ('prompt' itself unused)."""
    return _split_shared_prompt(_plain(record.get("chosen"), "chosen"), _plain(record.get("rejected"), "rejected"))


def _hh_messages(text: Any, side: str) -> list[dict]:
    if not isinstance(text, str) or not HH_TURN.search(text):
        raise SkipRecord(f"'{side}' must be a '\\n\\nHuman: ... \\n\\nAssistant: ...' string")
    markers = list(HH_TURN.finditer(text))
    if text[:markers[0].start()].strip():
        raise SkipRecord(f"'{side}' has text before its first Human:/Assistant: turn")
    messages = []
    for marker, following in zip(markers, markers[1:] + [None]):
        body = text[marker.end():following.start() if following else len(text)].strip()
        messages.append({"role": "user" if "Human" in marker.group() else "assistant", "content": body})
    return messages


def from_hh_rlhf(record: dict) -> dict:
    return _split_shared_prompt(_hh_messages(record.get("chosen"), "chosen"),
                                _hh_messages(record.get("rejected"), "rejected"))


def _sharegpt_turns(value: Any, side: str) -> list[dict]:
    turns = value if isinstance(value, list) else [value]
    messages = []
    for n, turn in enumerate(turns, 1):
        if isinstance(turn, str):
            messages.append({"role": "assistant", "content": turn})
        elif isinstance(turn, dict) and turn.get("from") in SHAREGPT_ROLES:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
        else:
            raise SkipRecord(f"'{side}' turn {n}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}")
    return messages


def from_sharegpt_pairs(record: dict) -> dict:
    prompt = _sharegpt_turns(record.get("conversations"), "conversations")
    if isinstance(record.get("system"), str) and record["system"].strip():
        prompt = [{"role": "system", "content": record["system"]}, *prompt]
    return make_pair(prompt, _sharegpt_turns(record.get("chosen"), "chosen"),
                     _sharegpt_turns(record.get("rejected"), "rejected"))


CONVERTERS = {"pairs": from_pairs, "ultrafeedback": from_ultrafeedback, "hh-rlhf": from_hh_rlhf,
              "sharegpt-pairs": from_sharegpt_pairs}


def detect_pair(record: Any) -> str:
    """The pair layout of one record, from its keys and value types."""
    if not isinstance(record, dict):
        raise SkipRecord(f"a record must be a JSON object (got {type(record).__name__})")
    if "chosen" not in record or "rejected" not in record:
        raise SkipRecord(f"not a preference pair (keys {sorted(record)[:6]}): a pair needs 'chosen' and 'rejected' "
                         "beside 'prompt' (or a shared conversation)")
    if "conversations" in record:
        return "sharegpt-pairs"
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and "prompt" not in record:
        return "hh-rlhf"
    if _whole_conversation(chosen) and _whole_conversation(rejected):
        return "ultrafeedback"  # the prompt is their shared beginning
    return "pairs"


def _whole_conversation(value: Any) -> bool:
    """A list of messages that starts before the answer (a system or user turn)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) \
        and value[0].get("role") != "assistant"


def convert_pair(record: Any, fmt: str = "auto") -> tuple[str, dict]:
    """(layout, canonical pair) of one record; SkipRecord with the reason when it cannot be converted."""
    detected = detect_pair(record)  # also: an object with 'chosen' and 'rejected', whatever the layout asked for
    kind = detected if fmt == "auto" else fmt
    return kind, CONVERTERS[kind](record)


# --- reading and writing ------------------------------------------------------------------------------------------

def read_pairs(spec: str | Path, fmt: str = "auto", report: ReadReport | None = None,
               system: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, pair) for every convertible record of a file, folder or `builtin:NAME`; the rest are counted."""
    if fmt not in ("auto", *PAIR_FORMATS):
        raise UserError(f"data format '{fmt}' is not a pair layout; choose auto or one of: {', '.join(PAIR_FORMATS)}")
    report = report if report is not None else ReadReport(unit="pairs")
    for where, record in iter_records(pair_source(spec)):
        report.read += 1
        try:
            if isinstance(record, SkipRecord):
                raise record
            kind, pair = convert_pair(record, fmt)
        except SkipRecord as exc:
            report.skip(where, str(exc))
            continue
        report.converted += 1
        report.formats[kind] = report.formats.get(kind, 0) + 1
        yield where, {**pair, "prompt": add_system(pair["prompt"], system)}


def write_pairs(path: Path, pairs: Iterator[dict]) -> int:
    """Canonical pair JSONL, written atomically; returns the number of lines."""
    count = 0
    with atomic_file(Path(path)) as handle:
        for pair in pairs:
            handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
            count += 1
    return count


def convert_pair_file(src: Path, out: Path, fmt: str = "auto", system: str | None = None,
                      strict: bool = False) -> ReadReport:
    """`lowtune data convert` for pairs: `out` in the canonical pair form; with strict, the first skip is an error."""
    report = ReadReport(unit="pairs")

    def pairs() -> Iterator[dict]:
        for _, pair in read_pairs(src, fmt, report, system):
            if strict and report.skipped:
                break
            yield pair
        if strict and report.skipped:
            raise UserError(f"{report.reasons[0]} (--strict; drop --strict to skip such pairs and count them)")

    write_pairs(out, pairs())
    if report.converted == 0:
        Path(out).unlink(missing_ok=True)
        first = f"; first problem: {report.reasons[0]}" if report.reasons else ""
        raise UserError(f"{src}: no preference pair could be converted{first}")
    return report


def pair_conversations(pair: dict) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen, prompt + rejected): earlier answers in the prompt are context, never trained."""
    prompt = [{**m, "loss": False} if m["role"] == "assistant" else m for m in pair["prompt"]]
    return prompt + pair["chosen"], prompt + pair["rejected"]

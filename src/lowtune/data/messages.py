"""Canonical conversations and what every reader shares: the record that cannot be converted (`SkipRecord`), the
report of a read (`ReadReport`), message validation, XTuner's turn layout, the default system prompt, literals.

Layer 1. The readers (formats.py, msagent.py, sheets.py) import this module and not each other's internals.
A canonical conversation is `[{"role": "system"|"user"|"assistant", "content": "...", "loss": false?}, ...]`.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
SHOWN_REASONS = 5


class SkipRecord(Exception):
    """A record that cannot be converted; the message says why."""


@dataclass
class ReadReport:
    """What reading one or more sources produced: counts and the first few reasons for skipped records."""

    read: int = 0
    converted: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    unit: str = "conversations"
    """What a converted record is called in messages: conversations, or pairs."""

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < SHOWN_REASONS:
            self.reasons.append(f"{where}: {reason}")

    def note(self, where: str, text: str) -> None:
        if len(self.notes) < SHOWN_REASONS:
            self.notes.append(f"{where}: {text}")

    def describe(self) -> str:
        lines = [f"{self.converted} {self.unit} from {self.read} records"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.formats.items()))})" if self.formats else "")]
        if self.skipped:
            lines.append(f"skipped {self.skipped}; first reasons:")
            lines += [f"  {r}" for r in self.reasons]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _numbered(items: Any, not_a_list: str, item: str) -> Iterator[tuple[int, dict]]:
    """(n, object) for each item of a non-empty list, numbered from 1; a SkipRecord where the list or an item is not
    what a record needs."""
    if not isinstance(items, list) or not items:
        raise SkipRecord(not_a_list)
    for n, obj in enumerate(items, 1):
        if not isinstance(obj, dict):
            raise SkipRecord(f"{item} {n} is not an object")
        yield n, obj


# --- canonical messages (also OpenAI `messages`) ------------------------------------------------------------------

def _loss_flag(value: Any) -> bool:
    """XTuner's rule: missing -> True; a bool as is; a string compares case-insensitively to 'true'."""
    if value is None or isinstance(value, bool):
        return value is not False
    if isinstance(value, str):
        return value.strip().lower() == "true"
    raise SkipRecord(f"'loss' must be true or false (got {value!r})")


def normalize_messages(messages: Any) -> list[dict]:
    """Validated canonical messages, following XTuner's openai_map_fn rules.

    Leading assistant messages are dropped (unless the answer is all there is: a pretraining sample); consecutive
    user messages are joined with no separator; roles other than system/user/assistant are rejected.
    """
    out: list[dict] = []
    for n, msg in _numbered(messages, "'messages' must be a non-empty list", "message"):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise SkipRecord(f"message {n} has role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise SkipRecord(f"message {n} ({role}) has no text content")
        if role != "system" and not content.strip():
            raise SkipRecord(f"message {n} ({role}) is empty")
        item = {"role": role, "content": content}
        if role == "assistant" and not _loss_flag(msg.get("loss")):
            item["loss"] = False
        if role == "user" and out and out[-1]["role"] == "user":
            out[-1]["content"] += content
            continue
        out.append(item)
    out = [m for m in out if m["role"] != "system" or m["content"].strip()]
    if [m["role"] for m in out] != ["assistant"]:
        first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if first_user is None:
            raise SkipRecord("no user message")
        out = [m for i, m in enumerate(out) if m["role"] != "assistant" or i > first_user]
    if not any(m["role"] == "assistant" for m in out):
        raise SkipRecord("no assistant answer")
    return out


# --- XTuner conversation turns ------------------------------------------------------------------------------------

def _text(turn: dict, key: str, n: int) -> str:
    value = turn.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SkipRecord(f"turn {n} '{key}' must be text (got {type(value).__name__})")
    return value


def from_xtuner(record: dict) -> list[dict]:
    """{"conversation": [{"system", "input", "output"}, ...]}; one turn with only output = incremental pretraining."""
    turns = record.get("conversation")
    messages: list[dict] = []
    for n, turn in _numbered(turns, "'conversation' must be a non-empty list of turns", "turn"):
        system, user, answer = _text(turn, "system", n), _text(turn, "input", n), _text(turn, "output", n)
        if not answer.strip():
            raise SkipRecord(f"turn {n} has no output")
        if system.strip():
            messages.append({"role": "system", "content": system})
        if user.strip():
            messages.append({"role": "user", "content": user})
        elif n == 1 and len(turns) > 1:
            raise SkipRecord("turn 1 has no input")
        messages.append({"role": "assistant", "content": answer})
    return normalize_messages(messages)


def check_encodable(messages: list[dict]) -> list[dict]:
    """The messages, or a SkipRecord when a text holds an unpaired surrogate (JSON `\\ud800`) that no UTF-8 file,
    tokenizer or model can take."""
    for n, msg in enumerate(messages, 1):
        try:
            msg["content"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SkipRecord(f"message {n} holds an unpaired surrogate (\\u{ord(exc.object[exc.start]):04x}); "
                             "fix the escape in the file") from None
    return messages


# --- helpers ------------------------------------------------------------------------------------------------------

def add_system(messages: list[dict], system: str | None) -> list[dict]:
    """Prepend a system prompt to a conversation that has none (pretraining samples are left alone)."""
    if not system or any(m["role"] == "system" for m in messages) or messages[0]["role"] != "user":
        return messages
    return [{"role": "system", "content": system}, *messages]


def literal(text: str) -> Any:
    """Parse a JSON or Python-literal string (never `eval`)."""
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        pass
    except RecursionError:
        raise SkipRecord("nested too deeply") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise SkipRecord(f"not a JSON or Python literal ({type(exc).__name__})") from None

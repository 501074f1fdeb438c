"""Dataset formats -> canonical conversations `[{"role", "content", "loss"?}, ...]`.

Layer 1. Readers accept JSONL and JSON arrays whatever the file extension (UTF-8, with or without BOM), plain text
(one pretraining sample per line, as `datasets`' text loader does), spreadsheets and CSV (pandas), and Hugging Face
dataset folders saved locally (`datasets`). Each record converts on its own; a record that cannot be converted is
skipped with a reason naming `file:line` (or the sheet row), counted in a `ReadReport`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowtune.errors import UserError
from lowtune.runs import close_name_hint, share_like_open

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".csv", ".tsv")
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

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < SHOWN_REASONS:
            self.reasons.append(f"{where}: {reason}")

    def note(self, where: str, text: str) -> None:
        if len(self.notes) < SHOWN_REASONS:
            self.notes.append(f"{where}: {text}")

    def describe(self) -> str:
        lines = [f"{self.converted} conversations from {self.read} records"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.formats.items()))})" if self.formats else "")]
        if self.skipped:
            lines.append(f"skipped {self.skipped}; first reasons:")
            lines += [f"  {r}" for r in self.reasons]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


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
    if not isinstance(messages, list) or not messages:
        raise SkipRecord("'messages' must be a non-empty list")
    out: list[dict] = []
    for n, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            raise SkipRecord(f"message {n} is not an object")
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


def from_messages(record: dict) -> list[dict]:
    return normalize_messages(record.get("messages"))


# --- XTuner conversation -------------------------------------------------------------------------------------------

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
    if not isinstance(turns, list) or not turns:
        raise SkipRecord("'conversation' must be a non-empty list of turns")
    messages: list[dict] = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise SkipRecord(f"turn {n} is not an object")
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


# --- Alpaca --------------------------------------------------------------------------------------------------------

def from_alpaca(record: dict) -> list[dict]:
    """instruction/input/output (+ system, history of [question, answer] pairs); `<nooutput>` rows are dropped."""
    instruction, extra, answer = (record.get(k) or "" for k in ("instruction", "input", "output"))
    if not all(isinstance(v, str) for v in (instruction, extra, answer)):
        raise SkipRecord("instruction/input/output must be text")
    if not answer.strip() or answer.strip() == "<nooutput>":
        raise SkipRecord("no output")
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    if not prompt.strip():
        raise SkipRecord("no instruction")
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    for pair in record.get("history") or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise SkipRecord("'history' must be a list of [question, answer] pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return normalize_messages(messages)


# --- ShareGPT ------------------------------------------------------------------------------------------------------

def from_sharegpt(record: dict) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise SkipRecord("'conversations' must be a list of {from, value}")
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            raise SkipRecord(f"turn {n}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    return normalize_messages(messages)


# --- openassistant-guanaco -----------------------------------------------------------------------------------------

GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant):")


def from_guanaco(record: dict, report: ReadReport | None = None, where: str = "") -> list[dict]:
    """`### Human: ... ### Assistant: ...`: split on the role markers only, so a '###' inside an answer stays."""
    text = record.get("text")
    if not isinstance(text, str):
        raise SkipRecord("'text' must be a string")
    parts = GUANACO_MARKER.split(text.strip())
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if report is not None and any("###" in body for _, body in turns):
        report.note(where, "'###' inside a turn kept as text (XTuner would split the turn there)")
    messages = []
    for role, body in turns:
        want = "user" if not messages or messages[-1]["role"] == "assistant" else "assistant"
        if ("user" if role == "Human" else "assistant") != want:
            raise SkipRecord(f"turns must alternate Human/Assistant (two {role} turns in a row)")
        messages.append({"role": want, "content": body})
    if messages and messages[-1]["role"] == "user":
        messages.pop()  # XTuner drops a trailing question without an answer
    if not messages:
        raise SkipRecord("no '### Human:' / '### Assistant:' pair")
    return normalize_messages(messages)


# --- plain text (pretraining) --------------------------------------------------------------------------------------

def from_text(record: dict) -> list[dict]:
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise SkipRecord("empty 'text'")
    return [{"role": "assistant", "content": text}]


# --- MS-Agent -> ReAct ---------------------------------------------------------------------------------------------

def from_msagent(record: dict) -> list[dict]:
    from lowtune.data.msagent import msagent_to_messages

    return msagent_to_messages(record)


CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": from_messages,
    "xtuner": from_xtuner,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "guanaco": from_guanaco,
    "msagent": from_msagent,
    "text": from_text,
}
FORMATS = ("auto", *CONVERTERS)


def detect(record: Any) -> str:
    """The format of one record, from its keys."""
    if not isinstance(record, dict):
        raise SkipRecord(f"a record must be a JSON object (got {type(record).__name__})")
    if "messages" in record:
        return "messages"
    if "conversation" in record:
        return "xtuner"
    if "conversations" in record:
        return "msagent" if isinstance(record["conversations"], str) else "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "text" in record:
        return "guanaco" if isinstance(record["text"], str) and GUANACO_MARKER.search(record["text"]) else "text"
    if "input" in record and "output" in record:
        return "alpaca"  # XTuner's default_map_fn layout: plain input/output columns
    raise SkipRecord(f"unknown record layout with keys {sorted(record)[:6]}; see `lowtune data convert --help`")


def convert_record(record: Any, fmt: str = "auto", report: ReadReport | None = None,
                   where: str = "", label: str | None = None) -> list[dict]:
    """One record -> canonical messages. Raises SkipRecord with the reason when it cannot be converted."""
    kind = detect(record) if fmt == "auto" else fmt
    if not isinstance(record, dict):
        raise SkipRecord(f"a record must be a JSON object (got {type(record).__name__})")
    if kind == "alpaca" and "instruction" not in record:
        record = {"instruction": record.get("input"), "output": record.get("output"), "system": record.get("system")}
    if kind == "guanaco":
        messages = from_guanaco(record, report, where)
    else:
        messages = CONVERTERS[kind](record)
    if report is not None:
        report.formats[label or kind] = report.formats.get(label or kind, 0) + 1
    return messages


# --- readers -------------------------------------------------------------------------------------------------------

def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) from a JSON array or JSONL file; bad JSON lines are yielded as SkipRecord instances."""
    with path.open(encoding="utf-8-sig") as handle:
        first = ""
        while not first:
            char = handle.read(1)
            if not char:
                return
            first = char.strip()
        handle.seek(0)
        if first == "[":
            try:
                items = json.load(handle)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file or write one "
                                "JSON object per line (JSONL)") from None
            for n, item in enumerate(items, 1):
                yield f"{path} item {n}", item
            return
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{n}", SkipRecord(f"bad JSON ({exc.msg} at column {exc.colno})")


def _text_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for n, line in enumerate(handle, 1):
            if line.strip():
                yield f"{path}:{n}", {"text": line.rstrip("\n")}


def missing_dataset(path: Path) -> UserError:
    """'dataset not found', with the closest file name in the same folder (a typo is the usual cause)."""
    return UserError(f"dataset not found: {path}{close_name_hint(Path(path), folders_only=False)}")


def iter_records(path: Path, sheet: str | None = None, mapping: dict[str, str] | None = None,
                 system: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs from any supported source; a record may be a SkipRecord to count."""
    path = Path(path)
    if path.is_dir():
        from lowtune.data.hfdir import dataset_folder_records

        yield from dataset_folder_records(path)
    elif not path.is_file():
        raise missing_dataset(path)
    elif path.suffix.lower() in SPREADSHEET_SUFFIXES:
        from lowtune.data.sheets import sheet_records

        yield from sheet_records(path, sheet, mapping, system)
    elif path.suffix.lower() in (".txt", ".md"):
        yield from _text_records(path)
    else:
        yield from _json_records(path)


def read_conversations(path: str | Path, fmt: str = "auto", report: ReadReport | None = None,
                       sheet: str | None = None, mapping: dict[str, str] | None = None,
                       system: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) for every convertible record of a source; the rest are counted in `report`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown data format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    report = report if report is not None else ReadReport()
    label = "spreadsheet" if Path(path).suffix.lower() in SPREADSHEET_SUFFIXES else None
    if label and fmt not in ("auto", "messages"):
        raise UserError(f"--format {fmt} does not apply to a spreadsheet ({Path(path).name}): each row becomes one "
                        "conversation from its --map columns (input=COL output=COL); drop --format")
    for where, record in iter_records(Path(path), sheet, mapping, system):
        report.read += 1
        try:
            if isinstance(record, SkipRecord):
                raise record
            messages = convert_record(record, fmt, report, where, label)
        except SkipRecord as exc:
            report.skip(where, str(exc))
            continue
        report.converted += 1
        yield where, messages


def add_system(messages: list[dict], system: str | None) -> list[dict]:
    """Prepend a system prompt to a conversation that has none (pretraining samples are left alone)."""
    if not system or any(m["role"] == "system" for m in messages) or messages[0]["role"] != "user":
        return messages
    return [{"role": "system", "content": system}, *messages]


def write_jsonl(path: Path, conversations: Iterator[list[dict]] | list[list[dict]]) -> int:
    """Write canonical JSONL atomically (temp file + rename); returns the number of lines."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for messages in conversations:
                handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                count += 1
        share_like_open(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def literal(text: str) -> Any:
    """Parse a JSON or Python-literal string (never `eval`)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise SkipRecord(f"not a JSON or Python literal ({type(exc).__name__})") from None

"""Dataset formats -> canonical conversations `[{"role", "content", "loss"?}, ...]`.

Layer 1. Readers accept JSONL and JSON arrays whatever the file extension (UTF-8, with or without BOM), plain text
(one pretraining sample per line, as `datasets`' text loader does), spreadsheets and CSV (pandas), and Hugging Face
dataset folders saved locally (`datasets`). Each record converts on its own; a record that cannot be converted is
skipped with a reason naming `file:line` (or the sheet row), counted in a `ReadReport`. What every reader shares
(SkipRecord, ReadReport, message validation) is in messages.py; spreadsheets, dataset folders and MS-Agent rows have
their own modules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lowtune.data.hfdir import dataset_folder_records
from lowtune.data.messages import ReadReport, SkipRecord, check_encodable, from_xtuner, normalize_messages
from lowtune.data.msagent import msagent_to_messages
from lowtune.data.sheets import sheet_records
from lowtune.errors import UserError
from lowtune.runs import atomic_file, close_name_hint

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".csv", ".tsv")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read by `datasets`, like a dataset folder


# --- canonical messages (also OpenAI `messages`) ------------------------------------------------------------------

def from_messages(record: dict) -> list[dict]:
    return normalize_messages(record.get("messages"))


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


CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": from_messages,
    "xtuner": from_xtuner,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "guanaco": from_guanaco,
    "msagent": msagent_to_messages,  # MS-Agent -> ReAct
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
    if "chosen" in record and "rejected" in record:
        raise SkipRecord("a preference pair (chosen/rejected): train it with train.method=dpo, orpo or simpo")
    raise SkipRecord(f"unknown record layout with keys {sorted(record)[:6]}; see `lowtune data convert --help`")


def convert_record(record: Any, fmt: str = "auto", report: ReadReport | None = None,
                   where: str = "", label: str | None = None) -> list[dict]:
    """One record -> canonical messages. Raises SkipRecord with the reason when it cannot be converted."""
    kind = detect(record) if fmt == "auto" else fmt
    if not isinstance(record, dict):
        raise SkipRecord(f"a record must be a JSON object (got {type(record).__name__})")
    if kind == "alpaca" and "instruction" not in record:
        record = {"instruction": record.get("input"), "output": record.get("output"), "system": record.get("system")}
    try:
        messages = from_guanaco(record, report, where) if kind == "guanaco" else CONVERTERS[kind](record)
    except RecursionError:
        raise SkipRecord("nested too deeply") from None
    check_encodable(messages)
    if report is not None:
        report.formats[label or kind] = report.formats.get(label or kind, 0) + 1
    return messages


# --- readers -------------------------------------------------------------------------------------------------------

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = b"\xef\xbb\xbf"


def _decode_line(raw: bytes) -> str:
    """One line as text; a SkipRecord naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkipRecord(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                         "save the file as UTF-8") from None


def _parse_json(text: str) -> Any:
    """json.loads, with every way it can fail (bad JSON, too deep, a huge integer) as a SkipRecord."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SkipRecord(f"bad JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise SkipRecord("JSON nested too deeply") from None
    except ValueError as exc:
        raise SkipRecord(f"bad JSON ({exc})") from None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(number, bytes) of each line, the UTF-8 BOM removed; UTF-16 files are refused with the fix."""
    with path.open("rb") as handle:
        for n, raw in enumerate(handle, 1):
            if n == 1 and raw.startswith(UTF16_BOMS):
                raise UserError(f"{path}:1: the file is UTF-16 text; save it as UTF-8 (e.g. `iconv -f UTF-16 "
                                f"-t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`)")
            yield n, raw.removeprefix(UTF8_BOM) if n == 1 else raw


def _starts_with_bracket(path: Path) -> bool:
    """Whether the first non-blank character of the file is '[' (a JSON array rather than JSONL)."""
    for _, raw in _lines(path):
        if raw.strip():
            return raw.lstrip().startswith(b"[")
    return False


def _array_records(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes().removeprefix(UTF8_BOM)
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") \
            from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file or write one "
                        "JSON object per line (JSONL)") from None
    except (RecursionError, ValueError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UserError(f"{path}: not valid JSON ({reason}); fix the file or write one JSON object per line "
                        "(JSONL)") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: a JSON file must hold an array of records or one record per line (JSONL)")
    for n, item in enumerate(items, 1):
        yield f"{path} item {n}", item


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) from a JSON array or JSONL file; lines that cannot be read are yielded as SkipRecord."""
    if _starts_with_bracket(path):
        yield from _array_records(path)
        return
    for n, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            yield f"{path}:{n}", _parse_json(_decode_line(raw))
        except SkipRecord as exc:
            yield f"{path}:{n}", exc


def _text_records(path: Path) -> Iterator[tuple[str, Any]]:
    for n, raw in _lines(path):
        try:
            line = _decode_line(raw).rstrip("\r\n")
        except SkipRecord as exc:
            yield f"{path}:{n}", exc
            continue
        if line.strip():
            yield f"{path}:{n}", {"text": line}


def missing_dataset(path: Path) -> UserError:
    """'dataset not found', with the closest file name in the same folder (a typo is the usual cause)."""
    return UserError(f"dataset not found: {path}{close_name_hint(Path(path), folders_only=False)}")


def iter_records(path: Path, sheet: str | None = None, mapping: dict[str, str] | None = None,
                 system: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs from any supported source; a record may be a SkipRecord to count."""
    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix.lower() in TABLE_SUFFIXES):
        yield from dataset_folder_records(path)
    elif not path.is_file():
        raise missing_dataset(path)
    elif path.suffix.lower() in SPREADSHEET_SUFFIXES:
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


def write_jsonl(path: Path, conversations: Iterator[list[dict]] | list[list[dict]]) -> int:
    """Write canonical JSONL atomically (temp file + rename); returns the number of lines."""
    count = 0
    with atomic_file(Path(path)) as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            count += 1
    return count



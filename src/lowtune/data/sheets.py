"""Spreadsheets and CSV (pandas) -> one single-turn conversation per row.

Layer 1. Columns come from `--map input=COL output=COL [system=COL]`, where COL is a header name or a column letter
(A, D, ...); without a map, common header names (input/question/instruction, output/answer/response) are used.
Rows are reported as the spreadsheet shows them: the header is row 1, the first data row is row 2. A cell that is
empty or holds a "not available" marker (n/a, N/A, NA, #N/A, null, NaN) counts as missing; such rows are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowtune.data.messages import SkipRecord
from lowtune.errors import UserError, did_you_mean, require

GUESSES = {"input": ("input", "question", "instruction", "prompt", "query"),
           "output": ("output", "answer", "response", "completion")}
MAP_KEYS = ("input", "output", "system")
# Spreadsheet "not available" markers (a subset of pandas' NA strings: 'None' stays text, it can be an answer).
MISSING = {"", "n/a", "na", "#n/a", "null", "nan", "<na>", "#na"}


def _letter_index(ref: str) -> int | None:
    if not re.fullmatch(r"[A-Z]{1,2}", ref):
        return None
    index = 0
    for char in ref:
        index = index * 26 + ord(char) - ord("A") + 1
    return index - 1


def resolve_column(ref: str, columns: list[str], where: str) -> str:
    """A header name for `ref`: exact header, case-insensitive header, or a column letter."""
    if ref in columns:
        return ref
    folded = {str(c).strip().lower(): c for c in columns}
    if ref.strip().lower() in folded:
        return folded[ref.strip().lower()]
    index = _letter_index(ref)
    if index is not None and index < len(columns):
        return columns[index]
    raise UserError(f"{where}: no column '{ref}'{did_you_mean(ref, [str(c) for c in columns])}; "
                    f"columns are: {', '.join(str(c) for c in columns)}")


def resolve_mapping(mapping: dict[str, str] | None, columns: list[str], where: str) -> dict[str, str]:
    """{input, output[, system]} -> header names, guessing input/output from common names when not given."""
    mapping = dict(mapping or {})
    unknown = set(mapping) - set(MAP_KEYS)
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"--map {key}=...: unknown key{did_you_mean(key, MAP_KEYS)}; use input=, output=, system=")
    folded = {str(c).strip().lower(): c for c in columns}
    for key, names in GUESSES.items():
        if key not in mapping:
            found = next((folded[n] for n in names if n in folded), None)
            if found is None:
                raise UserError(f"{where}: say which column holds the {key}, e.g. --map {key}=COLUMN "
                                f"(columns: {', '.join(str(c) for c in columns)})")
            mapping[key] = str(found)
    return {key: resolve_column(ref, columns, where) for key, ref in mapping.items()}


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # NaN = empty cell
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_utf8(path: Path) -> None:
    """A CSV/TSV must be UTF-8: name the line of the first byte that is not."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8 "
                        "(Excel: Save As 'CSV UTF-8')") from None


def _csv_frame(pd: Any, path: Path):
    _check_utf8(path)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig"), str(path)


def _excel_frame(pd: Any, path: Path, sheet: str | None):
    require("openpyxl", "xlsx", "Reading .xlsx files")
    with pd.ExcelFile(path) as book:
        names = [str(n) for n in book.sheet_names]
        name = sheet if sheet is not None else names[0]
        if name not in names:
            raise UserError(f"{path}: no sheet '{name}'{did_you_mean(name, names)}; sheets are: {', '.join(names)}")
        return pd.read_excel(book, sheet_name=name, dtype=object, keep_default_na=False), f"{path} sheet {name}"


def _frame(path: Path, sheet: str | None):
    """(DataFrame, label); a file pandas cannot parse (damaged, empty, not what its suffix says) is a UserError."""
    pd = require("pandas", "xlsx", "Reading spreadsheets")
    csv = path.suffix.lower() in (".csv", ".tsv")
    try:
        return _csv_frame(pd, path) if csv else _excel_frame(pd, path, sheet)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas/openpyxl/zipfile: many types for a damaged file
        detail = (str(exc).strip().splitlines() or [""])[0][:120]
        kind = "CSV" if csv else "an Excel workbook"
        raise UserError(f"{path}: cannot be read as {kind} ({type(exc).__name__}: {detail}); check the file, "
                        "or save it again from a spreadsheet program") from None


def sheet_records(path: Path, sheet: str | None, mapping: dict[str, str] | None,
                  system: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, {"messages": ...}) per data row, or (where, SkipRecord) for a row missing its input or output."""
    frame, label = _frame(path, sheet)
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    cols = resolve_mapping(mapping, columns, label)
    for number, row in enumerate(frame.itertuples(index=False), start=2):
        values = dict(zip(columns, row))
        where = f"{label} row {number}"
        if not any(_cell(v).strip() for v in values.values()):
            continue  # a blank line, not a record
        texts = {key: _cell(values[col]) for key, col in cols.items()}
        missing = [key for key in ("input", "output") if texts[key].strip().lower() in MISSING]
        if missing:
            key = missing[0]
            shown = f"is '{texts[key].strip()}'" if texts[key].strip() else "is empty"
            yield where, SkipRecord(f"no {key}: column '{cols[key]}' {shown}")
            continue
        messages = []
        row_system = texts["system"] if texts.get("system", "").strip().lower() not in MISSING else system
        if row_system:
            messages.append({"role": "system", "content": row_system})
        messages += [{"role": "user", "content": texts["input"]}, {"role": "assistant", "content": texts["output"]}]
        yield where, {"messages": messages}

"""`lowtune data convert`: any supported source -> canonical JSONL, with skipped records counted and shown.

Layer 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lowtune.data.formats import read_conversations, write_jsonl
from lowtune.data.messages import ReadReport, add_system
from lowtune.data.pairs import PAIR_FORMATS, convert_pair_file, is_pair_file
from lowtune.errors import UserError


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """['input=Question', 'output=Answer'] -> {'input': 'Question', 'output': 'Answer'}."""
    mapping = {}
    for item in items or []:
        key, sep, column = item.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise UserError(f"--map '{item}' must look like input=COLUMN (or output=COLUMN, system=COLUMN)")
        mapping[key.strip()] = column.strip()
    return mapping


def convert_file(src: Path, out: Path, fmt: str = "auto", sheet: str | None = None,
                 mapping: dict[str, str] | None = None, system: str | None = None,
                 strict: bool = False) -> ReadReport:
    """Write `out` (atomically) from `src`; with strict, the first unconvertible record is an error. Preference
    pairs (a pair layout, or a source whose first record has chosen/rejected) are written as canonical pairs."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise UserError(f"-o {out} would overwrite the source; write to another file")
    if fmt in PAIR_FORMATS or (fmt == "auto" and is_pair_file(src)):
        return convert_pair_file(src, out, fmt, system, strict)
    report = ReadReport()

    def conversations() -> Iterator[list[dict]]:
        for _, messages in read_conversations(src, fmt, report, sheet, mapping, system):
            if strict and report.skipped:
                break
            yield add_system(messages, system)
        if strict and report.skipped:
            raise UserError(f"{report.reasons[0]} (--strict; drop --strict to skip such records and count them)")

    write_jsonl(out, conversations())
    if report.converted == 0:
        out.unlink(missing_ok=True)
        first = f"; first problem: {report.reasons[0]}" if report.reasons else ""
        raise UserError(f"{src}: no record could be converted{first}")
    return report

"""Bad input never crashes a reader (issue 19): hypothesis throws random bytes, wrong types, missing fields, empty
turns, huge lines, non-UTF-8, deep nesting, BOMs and CRLF at `lowtune data convert` and at every converter.

The only allowed outcomes are exit 0 with every skip counted and named `file:line` (or `row N` / `item N`), or exit 2
with one `error:` line; never a traceback (exit 1) and never a partial output file. Example counts are fixed per test
(`FUZZ`, listed in docs/reliability.md) to keep the file under ~90 s on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowtune.cli import main
from lowtune.data.formats import CONVERTERS, convert_record
from lowtune.data.messages import SkipRecord

FUZZ = {"records": 400, "jsonl": 150, "json_array": 60, "text": 40, "bytes": 80, "csv": 60, "xlsx": 25,
        "parquet": 12, "msagent": 200}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])
WHERE = re.compile(r"^  (.+?)(:\d+| row \d+| item \d+): ")

# --- strategies ----------------------------------------------------------------------------------------------------

TEXT = st.text(max_size=20) | st.sampled_from(["", " ", "\n", "<nooutput>", "\ud800", "### Human: a ### Assistant:"])
SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT
JSON_VALUE = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(TEXT, kids, max_size=4), max_leaves=12)
KEYS = st.sampled_from(["messages", "conversation", "conversations", "instruction", "input", "output", "text",
                        "system", "history", "role", "content", "from", "value", "loss"])
ROLE = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", None, 3])
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": TEXT | SCALAR, "loss": SCALAR,
                                              "from": ROLE, "value": TEXT | SCALAR})
TURN = st.fixed_dictionaries({}, optional={"system": TEXT | SCALAR, "input": TEXT | SCALAR,
                                           "output": TEXT | SCALAR})
RECORD = st.one_of(
    st.dictionaries(KEYS, JSON_VALUE, max_size=4),
    st.builds(lambda m: {"messages": m}, st.lists(MESSAGE, max_size=5) | JSON_VALUE),
    st.builds(lambda t: {"conversation": t}, st.lists(TURN, max_size=4) | JSON_VALUE),
    st.builds(lambda t: {"conversations": t}, st.lists(MESSAGE, max_size=4)),
    st.builds(lambda i, o, h: {"instruction": i, "output": o, "history": h}, TEXT | SCALAR, TEXT | SCALAR,
              st.lists(st.lists(TEXT | SCALAR, max_size=3), max_size=2) | SCALAR),
    st.builds(lambda t: {"text": t}, TEXT | SCALAR),
    JSON_VALUE,
)
GOOD = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'


def _deep(n: int) -> str:
    return '{"messages": ' + "[" * n + "]" * n + "}"


BAD_LINE = st.one_of(
    st.binary(max_size=40),
    st.just(b"\xff\xfe{}"), st.just(b'{"text": "caf\xe9"}'),
    st.integers(2_000, 200_000).map(lambda n: _deep(n).encode()),
    st.integers(10_000, 2_000_000).map(lambda n: ('{"text": "' + "x" * n + '"}').encode()),
    st.just(b"1" * 5000), st.just(b'{"text": "\\ud83d"}'), st.just(b"\x00\x00\x00"),
)
LINE = st.one_of(RECORD.map(lambda r: json.dumps(r).encode()), BAD_LINE, st.just(GOOD.encode()))
EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])
PREFIX = st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\n\n"])

# --- the CLI contract ----------------------------------------------------------------------------------------------


def convert(src: Path, *extra: str) -> tuple[int, str, Path]:
    """Run `lowtune data convert SRC -o OUT` in-process; (exit code, stdout+stderr, OUT)."""
    out = src.parent / "out.jsonl"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(["data", "convert", str(src), "-o", str(out), *extra])
    return code, buffer.getvalue(), out


def check_clean(src: Path, strict: bool = False) -> int:
    """Assert the contract for one source and return the exit code."""
    code, text, out = convert(src, *(["--strict"] if strict else []))
    assert code in (0, 2), text
    assert "Traceback" not in text and "internal error" not in text, text
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".out")]
    assert not leftovers, leftovers
    if code == 2:
        assert not out.exists(), text
        assert [line for line in text.splitlines() if line.startswith("error: ")], text
        return code
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows and all(isinstance(r["messages"], list) and r["messages"] for r in rows)
    assert f"({len(rows)} conversations)" in text
    for reason in re.findall(r"^  .*$", text, flags=re.MULTILINE):
        assert WHERE.match(reason), reason
    assert not (strict and "skipped" in text), text
    out.unlink()
    return code


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


# --- converters on records -----------------------------------------------------------------------------------------

@settings(max_examples=FUZZ["records"], **SETTINGS)
@given(record=RECORD, fmt=st.sampled_from(["auto", *CONVERTERS]))
def test_every_converter_returns_messages_or_a_skip(record, fmt):
    try:
        messages = convert_record(record, fmt)
    except SkipRecord as exc:
        assert str(exc)
        return
    assert messages and all(m["role"] in ("system", "user", "assistant") for m in messages)
    json.dumps(messages, ensure_ascii=False).encode("utf-8")


MSAGENT_VALUE = st.one_of(
    TEXT,
    st.builds(lambda a, b: f"<|startofthink|>```JSON\n{a}\n```<|endofthink|>{b}", JSON_VALUE.map(json.dumps), TEXT),
    st.builds(lambda a, b: f"x<|startofexec|>```JSON\n{a}\n```<|endofexec|>{b}", JSON_VALUE.map(json.dumps), TEXT),
    st.just("<|startofexec|>a<|startofexec|>b"), st.just("{" * 3000),
)
MSAGENT_ITEM = st.fixed_dictionaries({"from": st.sampled_from(["system", "user", "assistant", "x"]),
                                      "value": MSAGENT_VALUE | SCALAR})


@settings(max_examples=FUZZ["msagent"], **SETTINGS)
@given(items=st.lists(MSAGENT_ITEM, max_size=5), as_repr=st.booleans(), cut=st.integers(0, 50))
def test_msagent_rows_convert_or_skip(items, as_repr, cut):
    raw = repr(items) if as_repr else json.dumps(items)
    for conversations in (raw, raw[:-cut] if cut else raw, "[" * 5000 + raw):
        try:
            convert_record({"conversations": conversations}, "msagent")
        except SkipRecord:
            pass


# --- files through the CLI -----------------------------------------------------------------------------------------

@settings(max_examples=FUZZ["jsonl"], **SETTINGS)
@given(lines=st.lists(LINE, min_size=1, max_size=6), eol=EOL, prefix=PREFIX, strict=st.booleans())
def test_jsonl_files_convert_cleanly(lines, eol, prefix, strict):
    with scratch() as folder:
        src = folder / "data.jsonl"
        src.write_bytes(prefix + eol.join(lines) + eol)
        check_clean(src, strict)


@settings(max_examples=FUZZ["json_array"], **SETTINGS)
@given(records=st.lists(RECORD, max_size=5), junk=st.sampled_from([b"", b"\xff", b"]", b"[" * 3000, b",]"]),
       prefix=PREFIX)
def test_json_array_files_convert_cleanly(records, junk, prefix):
    with scratch() as folder:
        src = folder / "data.json"
        src.write_bytes(prefix + json.dumps(records).encode() + junk)
        check_clean(src)


@settings(max_examples=FUZZ["text"], **SETTINGS)
@given(lines=st.lists(st.binary(max_size=30) | TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
                      max_size=6), eol=EOL, prefix=PREFIX)
def test_text_files_convert_cleanly(lines, eol, prefix):
    with scratch() as folder:
        src = folder / "data.txt"
        src.write_bytes(prefix + eol.join(lines))
        check_clean(src)


@settings(max_examples=FUZZ["bytes"], **SETTINGS)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".txt", ".csv", ".tsv", ".xlsx"]))
def test_random_bytes_under_any_suffix(data, suffix):
    with scratch() as folder:
        src = folder / f"data{suffix}"
        src.write_bytes(data)
        check_clean(src)


CELL = TEXT.filter(lambda t: "\ud800" not in t) | st.sampled_from(["n/a", "NaN", "#N/A", '"', '"a,b"', "1.0"])


@settings(max_examples=FUZZ["csv"], **SETTINGS)
@given(header=st.lists(CELL | st.sampled_from(["input", "output", "question", "answer"]), min_size=1, max_size=4),
       rows=st.lists(st.lists(CELL, max_size=5), max_size=5), eol=EOL, prefix=PREFIX,
       junk=st.sampled_from([b"", b"\xff\xfe", b'"unclosed']))
def test_csv_files_convert_cleanly(header, rows, eol, prefix, junk):
    with scratch() as folder:
        src = folder / "data.csv"
        body = eol.join(",".join(cells).encode("utf-8") for cells in [header, *rows])
        src.write_bytes(prefix + body + junk)
        check_clean(src)


@pytest.fixture(scope="module")
def workbook_bytes() -> bytes:
    return (Path(__file__).parent / "data" / "MedInfo2019-QA-Medications.xlsx").read_bytes()


@settings(max_examples=FUZZ["xlsx"], **SETTINGS)
@given(cut=st.integers(0, 30_000), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                   max_size=4))
def test_damaged_workbooks_are_clean_errors(workbook_bytes, cut, flips):
    data = bytearray(workbook_bytes[:cut] if cut else workbook_bytes)
    for pos, bits in flips:
        if data:
            data[pos % len(data)] ^= bits
    with scratch() as folder:
        src = folder / "data.xlsx"
        src.write_bytes(bytes(data))
        check_clean(src)


@settings(max_examples=FUZZ["xlsx"], **SETTINGS)
@given(rows=st.lists(st.lists(SCALAR.filter(lambda v: not (isinstance(v, str) and "\ud800" in v)), min_size=2,
                              max_size=3), max_size=4))
def test_workbooks_with_odd_cells_convert_cleanly(rows):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    book.active.append(["input", "output", "system"])
    for row in rows:
        with contextlib.suppress(Exception):  # openpyxl refuses some control characters: leave those cells out
            book.active.append(row)
    with scratch() as folder:
        src = folder / "data.xlsx"
        book.save(src)
        check_clean(src)


@settings(max_examples=FUZZ["parquet"], **SETTINGS)
@given(columns=st.dictionaries(KEYS, st.sampled_from(["int", "str", "list", "struct", "null"]), min_size=1,
                               max_size=3), damage=st.sampled_from([None, "cut", "garbage"]))
def test_parquet_files_convert_cleanly(columns, damage):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    values = {"int": [1, 2], "str": ["q", ""], "list": [[{"role": "user", "content": "q"}], []],
              "struct": [{"role": "user", "content": "q"}, {"role": "x", "content": None}], "null": [None, None]}
    with scratch() as folder:
        src = folder / "train.parquet"
        pq.write_table(pa.table({key: values[kind] for key, kind in columns.items()}), src)
        if damage == "cut":
            src.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])
        elif damage == "garbage":
            src.write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1")
        check_clean(src)


# --- the reported bug, spelled out ---------------------------------------------------------------------------------

def test_a_line_that_is_not_utf8_is_skipped_with_its_number(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_bytes(GOOD.encode() + b"\n\xff\xfe{}\n" + GOOD.encode() + b"\r\n")
    code, text, out = convert(src)
    assert code == 0 and len(out.read_text(encoding="utf-8").splitlines()) == 2
    assert f"{src}:2: not UTF-8 text (byte 0xff at column 1)" in text
    code, text, _ = convert(src, "--strict")
    assert code == 2 and f"error: {src}:2: not UTF-8" in text and "Traceback" not in text


def test_a_utf16_file_is_refused_with_the_fix(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_bytes(("\ufeff" + GOOD + "\n").encode("utf-16-le"))
    code, text, out = convert(src)
    assert code == 2 and "UTF-16" in text and "iconv" in text and not out.exists()

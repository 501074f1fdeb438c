"""Bad preference pairs never crash a reader (issue 19): random records in the pair layouts (canonical, UltraFeedback,
HH-RLHF, ShareGPT pairs) convert to a canonical pair or a named skip, and `lowtune data convert` on a pair file
exits 0 with every skip named `file:line`, or 2 with one `error:` line and no output file.

Example counts are fixed (`FUZZ`, listed in docs/reliability.md) to keep the file within ~30 s on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowtune.cli import main
from lowtune.data.messages import SkipRecord
from lowtune.data.pairs import PAIR_FORMATS, convert_pair

FUZZ = {"pair_records": 300, "pair_files": 60}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])
ROLES = ("system", "user", "assistant")
WHERE = re.compile(r"^  (.+?):\d+: ")

TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "\ud800", "\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman:"])
SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT
ANY = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                   max_leaves=8)
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from([*ROLES, "tool", "gpt", None, 1]),
                                              "content": TEXT | SCALAR, "from": st.sampled_from(["human", "gpt", 2]),
                                              "value": TEXT | SCALAR})
SIDE = st.lists(MESSAGE, max_size=3) | TEXT | SCALAR | ANY
PAIR = st.one_of(
    st.fixed_dictionaries({"chosen": SIDE, "rejected": SIDE}, optional={"prompt": SIDE, "conversations": SIDE}),
    st.builds(lambda c, r: {"chosen": c, "rejected": r}, TEXT, TEXT),  # HH-RLHF strings
    st.builds(lambda conv, c, r: {"conversations": conv, "chosen": c, "rejected": r},
              st.lists(MESSAGE, max_size=3), MESSAGE | SCALAR, MESSAGE | SCALAR),  # ShareGPT pairs
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "messages"]), ANY, max_size=3),
    ANY,
)
GOOD = json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                   "rejected": [{"role": "assistant", "content": "b"}]})
LINE = st.one_of(PAIR.map(lambda r: json.dumps(r).encode()), st.just(GOOD.encode()), st.binary(max_size=20),
                 st.just(b"\xff\xfe{}"), st.just(b'{"chosen": "\\ud83d", "rejected": "x"}'))


@settings(max_examples=FUZZ["pair_records"], **SETTINGS)
@given(record=PAIR, fmt=st.sampled_from(["auto", *PAIR_FORMATS]))
def test_every_pair_layout_gives_a_pair_or_a_skip(record, fmt):
    try:
        _, pair = convert_pair(record, fmt)
    except SkipRecord as exc:
        assert str(exc)
        return
    assert pair["chosen"] and pair["rejected"], pair
    for side in ("prompt", "chosen", "rejected"):
        assert all(isinstance(m["content"], str) and m["role"] in ROLES for m in pair[side]), pair
    json.dumps(pair, ensure_ascii=False).encode("utf-8")


@settings(max_examples=FUZZ["pair_files"], **SETTINGS)
@given(lines=st.lists(LINE, min_size=1, max_size=5), strict=st.booleans())
def test_pair_files_convert_cleanly(lines, strict):
    with tempfile.TemporaryDirectory() as folder:
        src, out = Path(folder) / "pairs.jsonl", Path(folder) / "out.jsonl"
        src.write_bytes(GOOD.encode() + b"\n" + b"\n".join(lines) + b"\n")  # a pair first: read as a pair file
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = main(["data", "convert", str(src), "-o", str(out), *(["--strict"] if strict else [])])
        text = buffer.getvalue()
        assert code in (0, 2) and "Traceback" not in text and "internal error" not in text, text
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".out")], text
        if code == 2:
            assert not out.exists() and any(line.startswith("error: ") for line in text.splitlines()), text
            return
        pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert pairs and all(p["chosen"] and p["rejected"] for p in pairs), text
        for reason in re.findall(r"^  .*$", text, flags=re.MULTILINE):
            assert WHERE.match(reason), reason

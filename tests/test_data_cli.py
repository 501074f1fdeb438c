"""`lowtune data convert|identity|split|preview` end to end through the CLI entry point."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import pytest

from lowtune.cli import main
from lowtune.data.identity import ANSWERS, QUESTIONS, identity_conversations

MEDQA = Path(__file__).parent / "data" / "MedInfo2019-QA-Medications.xlsx"  # the tutorial's workbook
SYSTEM = ("You are a professional, highly experienced doctor professor. You always provide accurate, comprehensive, "
          "and detailed answers based on the patients' questions.")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def small_dataset(path: Path, count: int) -> Path:
    rows = [{"conversation": [{"input": f"question {i}", "output": f"answer {i}"}]} for i in range(count)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.skipif(not MEDQA.is_file(), reason="the real MedQA workbook is not present")
def test_medqa_convert_then_split_is_reproducible(tmp_path, capsys):
    out = tmp_path / "medqa.jsonl"
    assert main(["data", "convert", str(MEDQA), "--sheet", "DrugQA", "--map", "input=Question", "output=Answer",
                 "--system", SYSTEM, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "689 conversations from 690 records" in printed and "sheet DrugQA row 214: no output" in printed
    assert lines(out)[0]["messages"][0] == {"role": "system", "content": SYSTEM}
    assert main(["data", "split", str(out), "--train", "0.7", "--seed", "0"]) == 0
    train, test = tmp_path / "medqa.train.jsonl", tmp_path / "medqa.test.jsonl"
    first = (train.read_bytes(), test.read_bytes())
    assert (len(lines(train)), len(lines(test))) == (482, 207)
    assert main(["data", "split", str(out), "--train", "0.7", "--seed", "0"]) == 0
    assert (train.read_bytes(), test.read_bytes()) == first
    assert sorted(map(json.dumps, lines(train) + lines(test))) == sorted(map(json.dumps, lines(out)))
    assert main(["data", "convert", str(MEDQA), "--sheet", "DrugQA", "--map", "input=Question", "output=Answer",
                 "--strict", "-o", str(tmp_path / "strict.jsonl")]) == 2
    assert "row 214" in capsys.readouterr().err


def test_split_rounds_down_and_depends_on_the_seed(tmp_path):
    src = small_dataset(tmp_path / "d.json", 10)
    assert main(["data", "split", str(src), "--train", "0.7", "--seed", "1"]) == 0
    seed1 = (tmp_path / "d.train.jsonl").read_text(encoding="utf-8")
    assert len(seed1.splitlines()) == 7 and len((tmp_path / "d.test.jsonl").read_text().splitlines()) == 3
    assert main(["data", "split", str(src), "--train", "0.7", "--seed", "2"]) == 0
    assert (tmp_path / "d.train.jsonl").read_text(encoding="utf-8") != seed1
    assert main(["data", "split", str(src), "--train", "1.2"]) == 2


def test_written_files_get_the_umask_modes_others_can_read(tmp_path):
    mask = os.umask(0o022)
    try:
        assert main(["data", "split", str(small_dataset(tmp_path / "d.json", 4)), "--train", "0.5"]) == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d.train.jsonl").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_identity_paraphrases_questions_and_answers_deterministically(tmp_path):
    out = tmp_path / "self.jsonl"
    assert main(["data", "identity", "--name", "小明", "--author", "不要葱姜蒜", "--lang", "both", "--repeat", "3",
                 "--seed", "7", "-o", str(out)]) == 0
    rows = [r["messages"] for r in lines(out)]
    assert len(rows) == 3 * (len(QUESTIONS["zh"]) + len(QUESTIONS["en"]))
    questions = Counter(m[0]["content"] for m in rows)
    answers = Counter(m[1]["content"] for m in rows)
    assert len(questions) >= 60 and set(questions.values()) == {3}
    assert len(answers) >= 40 and all("小明" in a for a in answers)
    assert sum("不要葱姜蒜" in a for a in answers.elements()) > len(rows) / 2
    assert identity_conversations("小明", "不要葱姜蒜", "both", 3, 7) == rows
    assert identity_conversations("小明", "不要葱姜蒜", "both", 3, 8) != rows
    assert len(ANSWERS["zh"]) >= 24 and len(ANSWERS["en"]) >= 24


def test_identity_mix_keeps_the_requested_share(tmp_path, capsys):
    general = small_dataset(tmp_path / "general.json", 1000)
    out = tmp_path / "mix.jsonl"
    assert main(["data", "identity", "--name", "Ada", "--lang", "en", "--repeat", "2", "--mix", str(general),
                 "--ratio", "0.2", "-o", str(out)]) == 0
    rows = [r["messages"] for r in lines(out)]
    identity = sum("Ada" in m[-1]["content"] for m in rows)
    assert identity == 80 and len(rows) == 400  # 80 identity = 20 % of 400
    assert "80 identity + 320 from" in capsys.readouterr().out
    small = small_dataset(tmp_path / "small.json", 8)
    assert main(["data", "identity", "--name", "Ada", "--lang", "en", "--mix", str(small), "--ratio", "0.5",
                 "-o", str(out)]) == 0
    assert len(lines(out)) == 16  # too little general data: fewer identity rows, same share
    assert main(["data", "identity", "--name", "Ada", "--mix", str(small), "-o", str(out)]) == 2


def test_preview_marks_trained_spans_and_reports_lengths(tmp_path, capsys, micro_dir):
    src = tmp_path / "d.jsonl"
    long_answer = "word " * 300
    src.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Tell"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "late"}]},
    ]) + "\n", encoding="utf-8")
    assert main(["data", "preview", str(src), "--model", str(micro_dir), "-n", "1", "--max-length", "200"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n" in out
    assert f"── 1. {src}:1 · " in out and "── 2." not in out
    assert "3 samples" in out and "at max_length 200: 1 would be truncated, 1 dropped" in out


def test_preview_of_a_config_uses_its_data_and_template(tmp_path, capsys, micro_dir):
    src = small_dataset(tmp_path / "d.json", 3)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: '{micro_dir}', template: internlm_chat}}\n"
                      f"data: {{train: ['{src}'], max_length: 64, system: 'Be kind.'}}\n", encoding="utf-8")
    assert main(["data", "preview", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "<|System|>:Be kind.\n<|User|>:question 0<eoh>\n<|Bot|>:⟦answer 0<eoa>⟧\n" in out
    assert "template internlm_chat" in out and "at max_length 64" in out


def test_convert_rejects_a_bad_format_and_missing_file(tmp_path, capsys):
    assert main(["data", "convert", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "dataset not found" in capsys.readouterr().err
    small_dataset(tmp_path / "MedInfo2019-QA-Medications.json", 2)
    assert main(["data", "convert", str(tmp_path / "MedInfo2019-QA-Medication.json"), "-o", "o.jsonl"]) == 2
    assert f"(did you mean '{tmp_path}/MedInfo2019-QA-Medications.json'?)" in capsys.readouterr().err

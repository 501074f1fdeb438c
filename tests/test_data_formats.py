"""Every input format, from a small fixture in its real layout, converts to the expected canonical messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowtune.data.convert import convert_file, parse_mapping
from lowtune.data.formats import ReadReport, read_conversations
from lowtune.errors import UserError

MEDQA = Path(__file__).parent / "data" / "MedInfo2019-QA-Medications.xlsx"  # the tutorial's workbook


def read(path, fmt="auto", **kwargs):
    report = ReadReport()
    out = [m for _, m in read_conversations(path, fmt, report, **kwargs)]
    return out, report


def u(text):
    return {"role": "user", "content": text}


def a(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def s(text):
    return {"role": "system", "content": text}


def dump(path: Path, rows, array=False, bom=False):
    text = json.dumps(rows, ensure_ascii=False, indent=4) if array else \
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def test_xtuner_single_multi_turn_and_incremental_pretraining(tmp_path):
    rows = [
        {"conversation": [{"system": "You are a doctor.", "input": "Q1", "output": "A1"}]},
        {"conversation": [{"system": "S", "input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}]},
        {"conversation": [{"system": "", "input": "", "output": "Some corpus text."}]},
        {"conversation": [{"input": "Q", "output": ""}]},
    ]
    convs, report = read(dump(tmp_path / "x.jsonl", rows, array=True, bom=True))  # a JSON array named .jsonl
    assert convs == [[s("You are a doctor."), u("Q1"), a("A1")], [s("S"), u("Q1"), a("A1"), u("Q2"), a("A2")],
                     [a("Some corpus text.")]]
    assert report.skipped == 1 and report.reasons == [f"{tmp_path / 'x.jsonl'} item 4: turn 1 has no output"]


def test_openai_messages_follow_xtuner_rules(tmp_path):
    rows = [
        {"messages": [s("S"), u("Hi"), a("Hello", loss=False), u("More"), a("Sure", loss="TRUE")]},
        {"messages": [a("leading answer is dropped"), u("part one, "), u("part two"), a("ok", loss="false")]},
        {"messages": [u("q"), {"role": "tool", "content": "x"}, a("y")]},
        {"messages": [u("q"), a("y", loss=3)]},
    ]
    convs, report = read(dump(tmp_path / "m.json", rows))
    assert convs == [[s("S"), u("Hi"), a("Hello", loss=False), u("More"), a("Sure")],
                     [u("part one, part two"), a("ok", loss=False)]]
    assert report.skipped == 2
    assert "m.json:3: message 2 has role 'tool'" in report.reasons[0]
    assert "m.json:4: 'loss' must be true or false" in report.reasons[1]


def test_alpaca_rows(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "你好", "output": "Hello"},
        {"instruction": "Say hi", "input": "", "output": "Hi", "system": "Be brief.",
         "history": [["first q", "first a"]]},
        {"instruction": "Nothing", "input": "", "output": "<nooutput>"},
        {"input": "plain question", "output": "plain answer"},  # XTuner default_map_fn columns
    ]
    convs, report = read(dump(tmp_path / "alpaca.json", rows, array=True))
    assert convs == [[u("Translate\n你好"), a("Hello")],
                     [s("Be brief."), u("first q"), a("first a"), u("Say hi"), a("Hi")],
                     [u("plain question"), a("plain answer")]]
    assert report.skipped == 1 and report.reasons[0].endswith("item 3: no output")


def test_sharegpt_rows(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}]},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "{}"}]}]
    convs, report = read(dump(tmp_path / "sg.jsonl", rows))
    assert convs == [[s("S"), u("Q"), a("A")]]
    assert "turn 2: 'from' must be one of" in report.reasons[0]


def test_guanaco_splits_on_role_markers_and_reports_hash_marks(tmp_path):
    rows = [{"text": "### Human: What is ###?### Assistant: A markdown heading: ### Title. ### Human: thanks"},
            {"text": "### Human: Hi ### Assistant: Hello ### Human: Bye ### Assistant: Bye!"},
            {"text": "### Assistant: no question"}]
    convs, report = read(dump(tmp_path / "oasst.jsonl", rows))
    assert convs == [[u("What is ###?"), a("A markdown heading: ### Title.")],
                     [u("Hi"), a("Hello"), u("Bye"), a("Bye!")]]
    assert report.formats == {"guanaco": 2} and report.skipped == 1
    assert report.notes == [f"{tmp_path / 'oasst.jsonl'}:1: '###' inside a turn kept as text "
                            "(XTuner would split the turn there)"]


def test_plain_text_is_pretraining_one_sample_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\ufeffFirst line.\n\nSecond line.\n", encoding="utf-8")
    assert read(path)[0] == [[a("First line.")], [a("Second line.")]]
    assert read(dump(tmp_path / "t.jsonl", [{"text": "raw"}]))[0] == [[a("raw")]]


def test_bad_json_lines_are_counted_with_their_line_and_strict_fails(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"messages": [oops\n\n{"weird": 1}\n', encoding="utf-8")
    report = convert_file(src, tmp_path / "out.jsonl")
    assert report.converted == 1 and report.skipped == 2
    assert report.reasons[0].startswith(f"{src}:2: bad JSON")
    assert report.reasons[1].startswith(f"{src}:4: unknown record layout")
    with pytest.raises(UserError, match="mixed.jsonl:2: bad JSON"):
        convert_file(src, tmp_path / "strict.jsonl", strict=True)
    assert not (tmp_path / "strict.jsonl").exists() and not list(tmp_path.glob(".strict*"))


MSAGENT_SYSTEM = (
    "当前对话可以使用的插件信息如下，请自行判断是否需要调用插件来解决当前用户问题。\n\n"
    '1. {"name": "modelscope_text-ie", "description": "信息抽取服务", "url": "http://api/ie", "paths": '
    '[{"name": "modelscope_text-ie", "model_id": "/damo/nlp_structbert", "method": "post", "description": '
    '"信息抽取服务", "parameters": [{"name": "text", "description": "用户输入的文本", "required": "True"}, '
    '{"name": "schema", "description": "要抽取信息的json表示", "required": "True"}]}]}')
MSAGENT_ANSWER = ('<|startofthink|>```JSON\n{"api_name": "modelscope_text-ie", "url": "http://api/ie", '
                  '"parameters": {"text": "拜登宣布", "schema": "{\\"人物\\": null}"}}\n```<|endofthink|>\n\n'
                  '<|startofexec|>```JSON\n{"人物": ["拜登"]}\n```<|endofexec|>\n信息：人物：拜登')


def test_msagent_row_becomes_react_exactly_like_xtuner(tmp_path):
    items = [{"from": "system", "value": MSAGENT_SYSTEM}, {"from": "user", "value": "抽取人物"},
             {"from": "assistant", "value": MSAGENT_ANSWER}]
    rows = [{"id": 1, "conversations": repr(items)},  # a Python literal string, as in MSAgent-Bench
            {"conversations": json.dumps([{"from": "user", "value": "你好"}, {"from": "assistant", "value": "你好！"}],
                                         ensure_ascii=False)},
            {"conversations": "__import__('os').system('echo hacked')"},
            {"conversations": "[{'from': 'user', 'value': 'only one'}]"}]
    convs, report = read(dump(tmp_path / "msagent.jsonl", rows))
    system = ("你是一个可以调用外部工具的助手，可以使用的工具包括：\n"
              "{'modelscope_text-ie': \"信息抽取服务\\n输入参数: {'text': '用户输入的文本', 'schema': '要抽取信息的json表示'}\"}\n"
              "如果使用工具请遵循以下格式回复：\n```\nThought:思考你当前步骤需要解决什么问题，是否需要使用工具\n"
              "Action:工具名称，你的工具必须从 [['modelscope_text-ie']] 选择\nAction Input:工具输入参数\n```\n"
              "工具返回按照以下格式回复：\n```\nResponse:调用工具后的结果\n```\n如果你已经知道了答案，或者你不需要工具，"
              "请遵循以下格式回复\n```\nThought:给出最终答案的思考过程\nFinal Answer:最终答案\n```\n开始!\n")
    assert convs[0] == [
        s(system), u("抽取人物\n"),
        a("Action:modelscope_text-ie\nAction Input:{'text': '拜登宣布', 'schema': '{\"人物\": null}'}\n\n\n\n"),
        s("Response:{'人物': ['拜登']}\n"), a("Final Answer:信息：人物：拜登\n")]
    assert convs[1] == [u("你好\n"), a("Final Answer:你好！\n")]
    assert len(convs) == 2 and report.skipped == 2
    assert "not a JSON or Python literal" in report.reasons[0]
    assert "at least 2" in report.reasons[1]


def test_csv_and_xlsx_with_maps_and_missing_cells(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"Question": ["What is X?", "What is Y?", "  ", "What is Z?"],
                          "Type": ["a", "b", "c", "d"], "Answer": ["X is x.", "n/a", "orphan", "Z is z."]})
    frame.to_csv(tmp_path / "qa.csv", index=False)
    with pd.ExcelWriter(tmp_path / "qa.xlsx") as writer:
        pd.DataFrame({"Note": [1]}).to_excel(writer, sheet_name="Notes", index=False)
        frame.to_excel(writer, sheet_name="DrugQA", index=False)
    expected = [[s("Doc."), u("What is X?"), a("X is x.")], [s("Doc."), u("What is Z?"), a("Z is z.")]]
    convs, report = read(tmp_path / "qa.csv", mapping=parse_mapping(["input=Question", "output=answer"]),
                         system="Doc.")
    assert convs == expected
    assert report.reasons == [f"{tmp_path / 'qa.csv'} row 3: no output: column 'Answer' is 'n/a'",
                              f"{tmp_path / 'qa.csv'} row 4: no input: column 'Question' is empty"]
    convs, report = read(tmp_path / "qa.xlsx", sheet="DrugQA", mapping={"input": "A", "output": "C"}, system="Doc.")
    assert convs == expected and report.reasons[0].endswith("qa.xlsx sheet DrugQA row 3: no output: column "
                                                            "'Answer' is 'n/a'")
    with pytest.raises(UserError, match="no sheet 'drugqa' \\(did you mean 'DrugQA'\\?\\)"):
        read(tmp_path / "qa.xlsx", sheet="drugqa")
    with pytest.raises(UserError, match="no column 'Answr' \\(did you mean 'Answer'\\?\\)"):
        read(tmp_path / "qa.csv", mapping={"input": "Question", "output": "Answr"})
    with pytest.raises(UserError, match="--map 'output'"):
        parse_mapping(["output"])
    with pytest.raises(UserError, match=r"--format alpaca does not apply to a spreadsheet \(qa.csv\).*drop --format"):
        read(tmp_path / "qa.csv", "alpaca", mapping=parse_mapping(["input=Question", "output=Answer"]))


@pytest.mark.skipif(not MEDQA.is_file(), reason="the real MedQA workbook is not present")
def test_real_medqa_workbook(tmp_path):
    out = tmp_path / "medqa.jsonl"
    report = convert_file(MEDQA, out, sheet="DrugQA", mapping={"input": "Question", "output": "Answer"},
                          system="You are a professional, highly experienced doctor professor.")
    assert (report.read, report.converted, report.skipped) == (690, 689, 1)
    assert report.reasons == [f"{MEDQA} sheet DrugQA row 214: no output: column 'Answer' is 'n/a'"]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 689
    first = json.loads(lines[0])["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[1]["content"] == "how does rivatigmine and otc sleep medicine interact"


def test_hugging_face_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["Say hi", "Count"], "input": ["", "to 2"], "output": ["Hi", "1 2"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    expected = [[u("Say hi"), a("Hi")], [u("Count\nto 2"), a("1 2")]]
    convs, report = read(tmp_path / "saved")
    assert convs == expected and report.formats == {"alpaca": 2}
    parquet = tmp_path / "hub" / "data"
    parquet.mkdir(parents=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(parquet / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"instruction": ["x"], "input": [""], "output": ["y"]}).to_parquet(
        str(parquet / "test-00000-of-00001.parquet"))
    assert read(tmp_path / "hub")[0] == expected

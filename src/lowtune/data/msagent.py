"""MSAgent-Bench rows -> ReAct conversations, with the same strings as XTuner's `msagent_react_map_fn`.

Layer 1. A row's `conversations` is a string holding a list of {"from", "value"}; it is parsed with json or
`ast.literal_eval` (never `eval`). The system turn becomes a tool list plus the ReAct format block; an assistant
value's `<|startofthink|>` JSON becomes `Action:`/`Action Input:` lines; an `<|startofexec|>` result becomes a
`Response:` system message followed by the `Final Answer:` turn. Rows XTuner would drop silently are skipped with a
reason here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lowtune.data.messages import SkipRecord, from_xtuner, literal

THINK = re.compile(r"(.*?)(<\|startofthink\|>)(.*?)(<\|endofthink\|>)", re.DOTALL)
EXEC = re.compile(r"(<\|startofexec\|>)(.*?)(<\|endofexec\|>)(.*?)$", re.DOTALL)
EXEC_START = "<|startofexec|>"
SYSTEM_HEAD = "你是一个可以调用外部工具的助手，可以使用的工具包括：\n"
FORMAT_BLOCK = (
    "如果使用工具请遵循以下格式回复：\n```\n"
    "Thought:思考你当前步骤需要解决什么问题，是否需要使用工具\n"
    "Action:工具名称，你的工具必须从 [{names}] 选择\n"
    "Action Input:工具输入参数\n```\n工具返回按照以下格式回复：\n```\n"
    "Response:调用工具后的结果\n```\n如果你已经知道了答案，或者你不需要工具，"
    "请遵循以下格式回复\n```\n"
    "Thought:给出最终答案的思考过程\n"
    "Final Answer:最终答案\n```\n开始!\n")


def _fenced_json(text: str) -> Any:
    """The JSON inside a ```JSON ... ``` block (newlines removed first, as MSAgent-Bench values need)."""
    return json.loads(text.replace("```JSON", "").replace("```", "").replace("\n", ""))


def tools_in(text: str) -> list[dict]:
    """Every JSON object in `text` that has a name and a description (the tool specs of the system turn)."""
    decoder, pos, found = json.JSONDecoder(), 0, []
    while (start := text.find("{", pos)) != -1:
        try:
            obj, length = decoder.raw_decode(text[start:])
        except ValueError:
            pos = start + 1
            continue
        if isinstance(obj, dict) and "name" in obj and "description" in obj:
            found.append(obj)
            pos = start + length
        else:
            pos = start + 1
    return found


def react_system(system_value: str) -> str:
    apis: dict[str, str] = {}
    for tool in tools_in(system_value):
        apis[tool["name"]] = tool["description"]
        try:
            params = {p["name"]: p["description"] for p in tool["paths"][0]["parameters"]}
        except (KeyError, IndexError, TypeError):
            continue
        apis[tool["name"]] += f"\n输入参数: {params}"
    # Python reprs on purpose: the released XTuner adapters were trained on exactly this text.
    return f"{SYSTEM_HEAD}{apis}\n" + FORMAT_BLOCK.format(names=str(list(apis)))


def _think(match: re.Match) -> str:
    before, call = match.group(1).strip(), _fenced_json(match.group(3))
    thought = f"Thought:{before}\n" if before else ""
    return f"{thought}Action:{call['api_name']}\nAction Input:{call['parameters']}\n"


def _exec(match: re.Match) -> str:
    after = match.group(4).strip()
    return f"Response:{_fenced_json(match.group(2))}\n" + (f"Final Answer:{after}\n" if after else "")


def _answer_turns(value: str, system: str, user: str) -> list[dict]:
    result = None
    if EXEC_START in value:
        parts = value.split(EXEC_START)
        if len(parts) != 2:
            raise SkipRecord("an assistant turn holds more than one <|startofexec|> block")
        value, result = parts[0], EXEC_START + parts[1]
    try:
        value, calls = THINK.subn(_think, value)
    except (ValueError, KeyError, TypeError) as exc:
        raise SkipRecord(f"unreadable <|startofthink|> call ({type(exc).__name__})") from None
    turns = [{"system": system, "input": user, "output": f"{value}\n" if calls else f"Final Answer:{value}\n"}]
    if result is not None:
        try:
            response = EXEC.sub(_exec, result)
        except (ValueError, KeyError, TypeError):
            return turns  # XTuner keeps the call and drops an unreadable tool result
        if response.count("Final Answer:") == 1:
            response, final = response.split("Final Answer:")
            turns.append({"system": response, "input": "", "output": "Final Answer:" + final})
    return turns


def msagent_to_messages(record: dict) -> list[dict]:
    raw = record.get("conversations")
    items = literal(raw) if isinstance(raw, str) else raw
    if not isinstance(items, list) or len(items) < 2:
        raise SkipRecord("'conversations' must hold a list of at least 2 {from, value} items")
    turns: list[dict] = []
    system = user = ""
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("value"), str):
            raise SkipRecord(f"item {n} must be {{'from': ..., 'value': '...'}}")
        if item.get("from") == "system":
            system += react_system(item["value"])
        elif item.get("from") == "user":
            user += item["value"] + "\n"
        elif item.get("from") == "assistant":
            turns += _answer_turns(item["value"], system, user)
            system = user = ""
    if not turns:
        raise SkipRecord("no assistant turn")
    return from_xtuner({"conversation": turns})

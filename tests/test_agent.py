"""The ReAct agent against a fake Serper server on 127.0.0.1 and a scripted model; the tools on their own."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import pytest
from fakes.loopback import serve_in_thread, server_url, stop_server

from lowtune.data.msagent import msagent_to_messages
from lowtune.infer.agent import CORRECTION, Agent, agent_system, parse_reply, run_agent_chat
from lowtune.infer.tools import (ToolError, calculate, calculator_tool, default_tools, python_tool, run_python,
                                 search_tool)

SEARCH = "Thought:需要查询天气\nAction:web_search\nAction Input:{'query': '上海明天天气'}\n"
ORGANIC = [{"title": "上海天气预报", "snippet": "明天晴，25°C", "link": "https://weather.example/sh"}]


class ScriptedEngine:
    """Stands in for ChatEngine: returns the scripted outputs in order, streamed in small pieces."""

    name = "scripted"

    def __init__(self, outputs: list[str]) -> None:
        self.outputs, self.calls = list(outputs), []

    def stream(self, messages, sampling=None):
        self.calls.append([dict(m) for m in messages])
        text = self.outputs.pop(0)
        for i in range(0, len(text), 3):
            yield text[i:i + 3]


@pytest.fixture
def serper():
    """A fake serper.dev on 127.0.0.1: records requests; `state['status']` picks success or an HTTP error."""
    state = {"requests": [], "status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append({"path": self.path, "key": self.headers.get("X-API-KEY"), "body": body})
            payload = json.dumps({"organic": ORGANIC} if state["status"] == 200 else {"message": "down"}).encode()
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = serve_in_thread(Handler)
    state["url"] = server_url(server)
    yield state
    stop_server(server)


def tools_for(serper):
    return [search_tool("test-key", serper["url"]), python_tool(timeout=5), calculator_tool()]


def test_system_prompt_and_turns_match_what_conversion_trains(serper):
    tools = tools_for(serper)
    row_system = "你可以使用以下工具:\n" + "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in tools)
    answer = ('<|startofthink|>```JSON\n{"api_name": "calculator", "parameters": {"expression": "2+3"}}\n```'
              '<|endofthink|>\n<|startofexec|>```JSON\n{"result": 5}\n```<|endofexec|>\n等于5。')
    row = [{"from": "system", "value": row_system}, {"from": "user", "value": "2+3等于几"},
           {"from": "assistant", "value": answer}]
    trained = msagent_to_messages({"conversations": json.dumps(row, ensure_ascii=False)})
    engine = ScriptedEngine([trained[2]["content"], trained[4]["content"]])
    result = Agent(engine, tools).run("2+3等于几")
    assert result.answer == "等于5。" and result.stopped == "final"
    assert agent_system(tools) == trained[0]["content"]
    # every message the model saw before its final answer is the training conversation itself
    assert engine.calls[1] == trained[:4]


def test_search_then_answer(serper):
    engine = ScriptedEngine([SEARCH, "Thought:搜索结果说明天晴\nFinal Answer:上海明天晴，25°C。\n"])
    result = Agent(engine, tools_for(serper)).run("上海明天天气怎么样？")
    assert result.stopped == "final" and result.answer == "上海明天晴，25°C。"
    assert serper["requests"] == [{"path": "/search", "key": "test-key", "body": {"q": "上海明天天气"}}]
    assert engine.calls[1][-2] == {"role": "assistant", "content": SEARCH}
    assert engine.calls[1][-1] == {"role": "system", "content": f"Response:{ {'results': ORGANIC} }\n"}
    assert [s.kind for s in result.steps] == ["action", "final"]


def test_an_invented_tool_result_is_cut_and_replaced_by_the_real_one(serper):
    invented = ("Thought:算一下\nAction:calculator\nAction Input:{'expression': '2+3'}\n"
                "Response:{'result': 999}\nFinal Answer:999")
    engine = ScriptedEngine([invented, "Final Answer:5"])
    result = Agent(engine, tools_for(serper)).run("2+3?")
    assert result.steps[0].observation == {"result": 5} and result.answer == "5"
    assert "999" not in engine.calls[1][-2]["content"]


def test_malformed_output_is_asked_again_once_then_answered_plainly(serper):
    engine = ScriptedEngine(["我觉得答案是42", "Thought:好的\nFinal Answer:42"])
    result = Agent(engine, tools_for(serper)).run("答案是多少？")
    assert result.answer == "42" and [s.kind for s in result.steps] == ["malformed", "final"]
    assert engine.calls[1][-1] == {"role": "system", "content": CORRECTION}
    engine = ScriptedEngine(["随便说说", "还是随便说说"])
    result = Agent(engine, tools_for(serper)).run("答案是多少？")
    assert result.stopped == "plain" and result.answer == "还是随便说说" and len(engine.calls) == 2


def test_tool_failures_become_observations(serper):
    serper["status"] = 500
    outputs = [SEARCH,
               "Action:weather_api\nAction Input:{'city': '上海'}",
               "Action:calculator\nAction Input:{'expression': '1/0'}",
               "Action:python_interpreter\nAction Input:{'code': 'raise ValueError(\"bad input\")'}",
               "Final Answer:工具都失败了"]
    engine = ScriptedEngine(outputs)
    result = Agent(engine, tools_for(serper)).run("上海明天天气？")
    errors = [step.observation["error"] for step in result.steps if step.kind == "action"]
    assert errors[0].startswith("search failed: HTTP 500")
    assert "unknown tool 'weather_api'" in errors[1] and "division by zero" in errors[2]
    assert "ValueError: bad input" in errors[3]
    assert engine.calls[1][-1]["content"].startswith("Response:{'error': 'search failed: HTTP 500")
    assert result.answer == "工具都失败了"


def test_step_limit(serper):
    engine = ScriptedEngine(["Action:calculator\nAction Input:{'expression': '1+1'}"] * 10)
    result = Agent(engine, tools_for(serper), max_steps=3).run("loop")
    assert result.stopped == "step_limit" and "step limit is 3" in result.answer
    assert [s.kind for s in result.steps] == ["action"] * 3 + ["limit"] and len(engine.calls) == 4


def test_parse_reply_forms():
    assert parse_reply("Thought: t\nAction: calculator\nAction Input: 1+2").action_input == "1+2"
    reply = parse_reply("Thought:不需要工具\nFinal Answer:你好！\n")
    assert reply.final == "你好！" and reply.thought == "不需要工具" and reply.action is None
    assert parse_reply("just text").final is None and parse_reply("just text").action is None


def test_agent_session_prints_steps_and_answers_piped_lines(serper):
    engine = ScriptedEngine([SEARCH, "Final Answer:晴"])
    out = io.StringIO()
    assert run_agent_chat(engine, None, tools_for(serper), stdin=io.StringIO("上海明天天气？\n"), out=out) == 0
    text = out.getvalue()
    assert "Action: web_search {'query': '上海明天天气'}" in text and "Response:" in text
    assert text.rstrip().endswith("晴")


# --- the tools ----------------------------------------------------------------------------------------------------

def test_calculator_walks_the_ast_and_never_calls_eval(monkeypatch):
    def no_eval(*args, **kwargs):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    assert calculate("(3+5)*2") == 16 and calculate("sqrt(16) + 2**10") == 1028.0 and calculate("7 // 2") == 3
    assert calculate("3×4÷2") == 6.0
    for bad, message in [("__import__('os').system('true')", "unsupported"), ("x + 1", "unsupported"),
                         ("().__class__", "unsupported"), ("9**9**9", "exceed"), ("2^3", "use \\*\\*"),
                         ("1/0", "division by zero"), ("1 +", "not an arithmetic expression")]:
        with pytest.raises(ToolError, match=message):
            calculate(bad)


def test_python_tool_runs_isolated_with_timeout_and_no_secrets(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.getcwd())")
    assert "SERPER_API_KEY" not in result["stdout"] and "HF_TOKEN" not in result["stdout"]
    assert "lowtune-python-" in result["stdout"] and "error" not in result
    assert run_python("print(1 / 0)")["error"] == "ZeroDivisionError: division by zero"
    with pytest.raises(ToolError, match="longer than 1s"):
        run_python("while True: pass", timeout=1)


def test_default_tools_need_a_key_for_search(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    assert [t.name for t in default_tools()] == ["python_interpreter", "calculator"]
    assert [t.name for t in default_tools(serper_key="k")][0] == "web_search"


def test_cli_agent_with_the_real_engine(serper):
    """builtin:micro cannot follow the format: the agent asks again once, then shows its text as the answer."""
    env = dict(os.environ, SERPER_API_KEY="test-key", LOWTUNE_SERPER_URL=serper["url"])
    result = subprocess.run([sys.executable, "-m", "lowtune.cli", "chat", "builtin:micro", "--agent", "--prompt",
                             "上海明天天气？", "--max-new-tokens", "12"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "asking again" in result.stdout and result.stdout.strip().splitlines()[-1].strip()
    missing = subprocess.run([sys.executable, "-m", "lowtune.cli", "chat", "builtin:micro", "--agent", "--compare",
                              "--prompt", "x"], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "--agent and --compare" in missing.stderr

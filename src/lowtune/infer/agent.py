"""`lowtune chat --agent`: a ReAct loop in the exact format MS-Agent conversion trains.

The system prompt is built by the data converter's own `react_system` from the tools' MS-Agent specs, so it is
byte-for-byte the format the model was trained on. The model answers `Thought:/Action:/Action Input:` (a tool call)
or `Thought:/Final Answer:`; a tool's result goes back as a system message `Response:<result>`, exactly as converted
MS-Agent rows carry it. Tool calls are bounded by `max_steps`; a reply that is neither a call nor an answer is asked
again once, then shown as a plain answer; tool failures become `{'error': ...}` responses the model can react to.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from lowtune.data.msagent import react_system
from lowtune.generation import Sampling
from lowtune.infer.chat import CLEAR_WORDS, EXIT_WORDS, answer_lines, repl
from lowtune.infer.tools import Tool, ToolError, truncate

FINAL = "Final Answer:"
ACTION = re.compile(r"Action\s*:\s*(?P<name>[^\n]*)\n\s*Action Input\s*:\s*(?P<input>.*)", re.S)
THOUGHT = re.compile(r"Thought\s*:\s*(?P<thought>.*?)(?=\n\s*(Action\s*:|Final Answer\s*:)|$)", re.S)
HALLUCINATED = re.compile(r"\n\s*(Response|Observation)\s*:")
"""A model that starts writing the tool's result itself is cut there: the real result comes from the tool."""
CORRECTION = ("请严格按照格式回复：需要使用工具时输出 Thought、Action、Action Input 三行；"
              "已经知道答案时输出 Thought 和 Final Answer。")


class Answerer(Protocol):
    """What the agent needs from a chat engine (ChatEngine, or a scripted stand-in in tests)."""

    def stream(self, messages: list[dict], sampling: Sampling | None = None) -> Iterator[str]: ...


@dataclass
class Reply:
    """One model output, parsed."""

    text: str
    thought: str | None = None
    action: str | None = None
    action_input: str | None = None
    final: str | None = None


@dataclass
class Step:
    kind: str
    """'action', 'final', 'malformed' (asked again), 'plain' (answered as is) or 'limit'."""
    text: str = ""
    thought: str | None = None
    action: str | None = None
    arguments: Any = None
    observation: Any = None


@dataclass
class AgentResult:
    answer: str
    stopped: str
    """'final' (the model gave a Final Answer), 'plain' (malformed twice) or 'step_limit'."""
    steps: list[Step] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)


def agent_system(tools: list[Tool]) -> str:
    """The system prompt, built by the same function the MS-Agent converter uses for training data."""
    return react_system("\n".join(json.dumps(tool.spec(), ensure_ascii=False) for tool in tools))


def parse_reply(text: str) -> Reply:
    """Thought / Action / Action Input / Final Answer from a model output (a tool call wins over a later answer)."""
    reply = Reply(text=text)
    thought = THOUGHT.search(text)
    reply.thought = thought.group("thought").strip() if thought else None
    action = ACTION.search(text)
    final_at = text.find(FINAL)
    if action and (final_at < 0 or action.start() < final_at):
        reply.action = action.group("name").strip().strip("`'\"[]")
        reply.action_input = action.group("input").strip()
        return reply
    if final_at >= 0:
        reply.final = text[final_at + len(FINAL):].strip()
    return reply


def parse_arguments(raw: str) -> Any:
    """Action Input as the converter writes it (a Python dict repr), or JSON, or the bare text."""
    text = raw.strip().strip("`").strip()
    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return text


class Agent:
    """A ReAct episode per question over `engine` with `tools`."""

    def __init__(self, engine: Answerer, tools: list[Tool], sampling: Sampling | None = None, max_steps: int = 5,
                 on_step: Callable[[Step], None] | None = None) -> None:
        self.engine, self.sampling, self.max_steps = engine, sampling or Sampling(), max_steps
        self.tools = {tool.name: tool for tool in tools}
        self.system = agent_system(tools)
        self.on_step = on_step or (lambda step: None)

    def generate(self, messages: list[dict]) -> str:
        """The model's next output as generated, cut where it starts inventing a tool result."""
        pieces = self.engine.stream(messages, self.sampling)
        text = ""
        try:
            for piece in pieces:
                text += piece
                cut = HALLUCINATED.search(text)
                if cut and "Action" in text[:cut.start()]:
                    text = text[:cut.start() + 1]
                    break
        finally:
            close = getattr(pieces, "close", None)
            if close:
                close()  # stops generation at the next token
        return text

    def call_tool(self, reply: Reply) -> tuple[Any, Any]:
        """(arguments, result-or-{'error': ...}) of the tool call in `reply`."""
        arguments = parse_arguments(reply.action_input or "")
        tool = self.tools.get(reply.action or "")
        if tool is None:
            return arguments, {"error": f"unknown tool '{reply.action}'; choose one of {list(self.tools)}"}
        try:
            return arguments, tool.call(arguments)
        except ToolError as exc:
            return arguments, {"error": str(exc)}
        except Exception as exc:  # a tool bug must not end the chat; the model sees it as a failed call
            return arguments, {"error": f"{type(exc).__name__}: {exc}"}

    def _record(self, result: AgentResult, step: Step) -> None:
        result.steps.append(step)
        self.on_step(step)

    def run(self, question: str) -> AgentResult:
        # The converter appends "\n" to every user value; keep the prompt identical to training.
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question + "\n"}]
        result = AgentResult(answer="", stopped="", messages=messages)
        calls, asked_again = 0, False
        while True:
            reply = parse_reply(self.generate(messages))
            if reply.final is not None:
                result.answer, result.stopped = reply.final, "final"
                self._record(result, Step("final", reply.text, reply.thought))
                return result
            if reply.action is None:
                if asked_again:
                    result.answer, result.stopped = reply.text.strip(), "plain"
                    self._record(result, Step("plain", reply.text, reply.thought))
                    return result
                asked_again = True
                self._record(result, Step("malformed", reply.text, reply.thought))
                messages += [_said(reply), {"role": "system", "content": CORRECTION}]
                continue
            if calls >= self.max_steps:
                result.answer = f"(no final answer after {calls} tool calls; the step limit is {self.max_steps})"
                result.stopped = "step_limit"
                self._record(result, Step("limit", reply.text, reply.thought, reply.action))
                return result
            calls += 1
            arguments, observation = self.call_tool(reply)
            self._record(result, Step("action", reply.text, reply.thought, reply.action, arguments, observation))
            messages += [_said(reply), {"role": "system", "content": f"Response:{observation}\n"}]


def _said(reply: Reply) -> dict:
    """The model's output as an assistant turn, as generated (turns in the training data end with a newline)."""
    return {"role": "assistant", "content": reply.text if reply.text.endswith("\n") else reply.text + "\n"}


# --- terminal -----------------------------------------------------------------------------------------------------

def show_step(out: TextIO) -> Callable[[Step], None]:
    """Print each step of an episode as it happens."""
    def show(step: Step) -> None:
        if step.thought and step.kind in ("action", "final", "limit"):
            out.write(f"  Thought: {step.thought}\n")
        if step.kind == "action":
            out.write(f"  Action: {step.action} {step.arguments!r}\n")
            out.write(f"  Response: {truncate(str(step.observation), 500)}\n")
        elif step.kind == "malformed":
            out.write("  (reply not in the ReAct format; asking again)\n")
        out.flush()
    return show


@dataclass
class AgentSession:
    """The chat REPL's session for agent mode: every question is its own episode."""

    agent: Agent
    out: TextIO

    def ask(self, text: str) -> None:
        result = self.agent.run(text)
        self.out.write(f"{result.answer}\n")
        self.out.flush()

    def reset(self) -> None:
        """Nothing to forget: each question starts a fresh episode."""

    def command(self, line: str) -> bool | None:
        text = line.strip()
        if text in EXIT_WORDS:
            return True
        if text in CLEAR_WORDS:
            self.out.write("(each question already starts a fresh episode)\n")
            return False
        if text.startswith("/") and " " not in text:
            self.out.write(f"tools: {', '.join(self.agent.tools)} · /exit (or EXIT, Ctrl-D) quits\n")
            return False
        return None


def run_agent_chat(engine: Any, sampling: Sampling, tools: list[Tool], prompt: str | None = None,
                   max_steps: int = 5, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """`lowtune chat --agent`: --prompt answers once; a terminal gets the REPL; piped stdin answers line by line."""
    out = out or sys.stdout
    stdin = stdin or sys.stdin
    session = AgentSession(Agent(engine, tools, sampling, max_steps, on_step=show_step(out)), out)
    if prompt is not None:
        session.ask(prompt)
        return 0
    if stdin.isatty():
        names = ", ".join(tool.name for tool in tools)
        return repl(session, f"{engine.name} · agent with tools: {names} · at most {max_steps} tool calls a "
                             "question\n/exit (or EXIT, Ctrl-D) quits\n")
    return answer_lines(session, stdin)

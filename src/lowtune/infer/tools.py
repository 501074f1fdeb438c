"""Agent tools: web search through the Serper API, Python in a subprocess, and a calculator that never calls eval.

Each tool takes a dict of parameters and returns a JSON-like Python object (what the model sees after `Response:`).
Failures raise ToolError, which the agent shows to the model as an observation instead of crashing.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SERPER_URL = "https://google.serper.dev"
SERPER_URL_ENV = "LOWTUNE_SERPER_URL"
SERPER_KEY_ENV = "SERPER_API_KEY"
OUTPUT_LIMIT = 2000
"""Characters of tool output shown to the model."""


class ToolError(Exception):
    """A tool could not do its job; the message becomes the observation."""


@dataclass
class Tool:
    """A tool as the model sees it (name, description, parameters) and the function that runs it."""

    name: str
    description: str
    parameters: dict[str, str]
    """Parameter name -> description, in order; the first is used when the model passes a bare string."""
    run: Callable[[dict], Any] = field(repr=False)

    def spec(self) -> dict:
        """The MS-Agent tool spec (name, description, paths[0].parameters) the training data used."""
        params = [{"name": k, "description": v, "required": "True"} for k, v in self.parameters.items()]
        return {"name": self.name, "description": self.description,
                "paths": [{"name": self.name, "description": self.description, "parameters": params}]}

    def call(self, arguments: Any) -> Any:
        if not isinstance(arguments, dict):
            arguments = {next(iter(self.parameters)): arguments}
        missing = [k for k in self.parameters if k not in arguments]
        if missing:
            raise ToolError(f"missing parameter(s) {missing}; {self.name} takes {list(self.parameters)}")
        return self.run(arguments)


def truncate(text: str, limit: int = OUTPUT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


# --- web search (Serper) ------------------------------------------------------------------------------------------

def serper_search(query: str, api_key: str, base_url: str = SERPER_URL, timeout: float = 15.0,
                  results: int = 5) -> dict:
    """Top results of a Google search through serper.dev: an answer box when there is one, then title/snippet/link."""
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/search", data=json.dumps({"q": query}).encode("utf-8"), method="POST",
        headers={"X-API-KEY": api_key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise ToolError(f"search failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ToolError(f"search failed: {getattr(exc, 'reason', exc)}") from None
    except json.JSONDecodeError:
        raise ToolError("search failed: the search service did not answer with JSON") from None
    found: dict[str, Any] = {}
    box = payload.get("answerBox") or {}
    if box.get("answer") or box.get("snippet"):
        found["answer"] = box.get("answer") or box.get("snippet")
    found["results"] = [{"title": r.get("title", ""), "snippet": r.get("snippet", ""), "link": r.get("link", "")}
                        for r in payload.get("organic", [])[:results]]
    if not found["results"] and "answer" not in found:
        found["results"] = "no results"
    return found


def search_tool(api_key: str, base_url: str | None = None) -> Tool:
    url = base_url or os.environ.get(SERPER_URL_ENV) or SERPER_URL
    return Tool(name="web_search", description="网络搜索：用搜索引擎查询实时信息（新闻、天气、事实等）",
                parameters={"query": "要搜索的内容"},
                run=lambda args: serper_search(str(args["query"]), api_key, url))


# --- Python in a subprocess ---------------------------------------------------------------------------------------

SAFE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT")
"""The only variables the Python tool inherits: no API keys, tokens or proxies."""


LAUNCHER = (
    "import sys\n"
    "try:\n"
    "    import resource\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))\n"
    "except (ImportError, ValueError, OSError):\n"
    "    pass\n"
    "source = sys.argv[2]\n"
    "del sys.argv[1:3]\n"
    "exec(compile(source, '<python tool>', 'exec'), {'__name__': '__main__'})\n"
)
"""Runs in the child: caps its address space, then runs the model's code as a script."""


def run_python(code: str, timeout: float = 10.0, memory_bytes: int = 1 << 30) -> dict:
    """Run `code` in a fresh isolated interpreter (-I) in a temporary folder, with a scrubbed environment, a memory
    cap and a timeout.

    Not a security sandbox: it keeps secrets out and stops runaway code, but the code runs as the current user.
    """
    env = {key: os.environ[key] for key in SAFE_ENV if key in os.environ}
    env["PYTHONIOENCODING"] = "utf-8"
    with tempfile.TemporaryDirectory(prefix="lowtune-python-") as folder:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", LAUNCHER, str(memory_bytes), code], cwd=folder,
                                  env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ToolError(f"the code ran longer than {timeout:g}s and was stopped") from None
    result: dict[str, Any] = {"stdout": truncate(done.stdout.strip())}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        result["error"] = truncate(lines[-1] if lines else f"exit status {done.returncode}")
    return result


def python_tool(timeout: float = 10.0) -> Tool:
    return Tool(name="python_interpreter", description="Python 代码执行器：运行一段 Python 代码，返回 print 的输出",
                parameters={"code": "要运行的 Python 代码"}, run=lambda args: run_python(str(args["code"]), timeout))


# --- calculator (ast, no eval) ------------------------------------------------------------------------------------

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_RESULT_BITS = 100_000
"""Integer powers larger than this (about 30,000 digits) are refused instead of computed."""
MAX_FACTORIAL = 1_000


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 \
            and abs(base).bit_length() * exponent > MAX_RESULT_BITS:
        raise ToolError(f"a power whose result would exceed {MAX_RESULT_BITS} bits is refused")


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
            and not node.keywords:
        args = [_value(a) for a in node.args]
        if node.func.id == "factorial" and args and args[0] > MAX_FACTORIAL:
            raise ToolError(f"factorial argument too large (limit {MAX_FACTORIAL})")
        return FUNCTIONS[node.func.id](*args)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("use ** for powers (^ is not supported)")
    raise ToolError(f"unsupported expression element: {ast.unparse(node)!r}; use numbers, + - * / // % **, "
                    f"parentheses, {', '.join(CONSTANTS)} and {', '.join(FUNCTIONS)}")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, walked node by node (no eval, no names beyond math functions)."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("（", "(").replace("）", ")")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return _value(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (ValueError, OverflowError, TypeError) as exc:
        raise ToolError(f"cannot compute {expression!r}: {exc}") from None


def calculator_tool() -> Tool:
    return Tool(name="calculator", description="计算器：计算数学表达式的值，支持 + - * / ** 和 sqrt、log 等函数",
                parameters={"expression": "数学表达式，例如 (3+5)*2"},
                run=lambda args: {"result": calculate(str(args["expression"]))})


def default_tools(serper_key: str | None = None, serper_url: str | None = None,
                  python_timeout: float = 10.0) -> list[Tool]:
    """Search (when a Serper key is set), Python and the calculator."""
    key = serper_key if serper_key is not None else os.environ.get(SERPER_KEY_ENV)
    tools = [search_tool(key, serper_url)] if key else []
    return tools + [python_tool(python_timeout), calculator_tool()]

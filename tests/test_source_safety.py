"""Untrusted files stay data (issue 19): a scan of lowtune's source, so that a new call site fails here.

- no eval/exec/compile/__import__ of anything, and no exec hidden in a string run elsewhere, except the agent's
  Python tool, which runs model-written code on purpose in a separate isolated interpreter (infer/tools.py);
- weights and states are read with safetensors or `torch.load(..., weights_only=True)`; no pickle, marshal, shelve,
  `np.load(allow_pickle=True)`, unsafe YAML or accelerate's pickled custom checkpoints;
- `trust_remote_code` is never switched on by the code itself: every function defaults it to False, every call passes
  a flag or config value through, and only `--trust-remote-code` / `model.trust_remote_code: true` set it;
- no shell: no `os.system`, `os.popen` or `shell=True`.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowtune"
FILES = sorted(SRC.rglob("*.py"))
# The one place that runs model output: the agent's Python tool, in `python -I` with a scrubbed environment, a memory
# cap and a timeout (docs/decisions.md, "Tools"). Keyed by file and the name of the constant holding the code.
RUNS_MODEL_CODE = {("infer/tools.py", "LAUNCHER")}
BUILTIN_RUN = re.compile(r"(?<![\w.])(exec|eval)\(")  # exec(...) / eval(...), not model.eval()
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "breakpoint"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
FORBIDDEN_ATTRS = {("os", "system"), ("os", "popen"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                   ("yaml", "load_all"), ("torch", "hub"), ("accelerator", "register_for_checkpointing")}


def parsed() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(SRC)), ast.parse(path.read_text(encoding="utf-8"))) for path in FILES]


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load(...), 'x.y.z' for chains of names; '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_scan_sees_every_module():
    assert len(FILES) > 60 and any(name == "train/checkpoint.py" for name, _ in parsed())


def test_no_eval_or_exec_of_data_or_model_output():
    found = [f"{name}:{c.lineno} {dotted(c.func)}()" for name, tree in parsed() for c in calls(tree)
             if isinstance(c.func, ast.Name) and c.func.id in FORBIDDEN_CALLS]
    assert not found, "eval/exec-like calls: " + ", ".join(found)


def test_code_run_in_a_child_interpreter_is_only_the_python_tool():
    found = set()
    for name, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant | ast.JoinedStr | ast.BinOp):
                texts = [n.value for n in ast.walk(node.value)
                         if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                if any(BUILTIN_RUN.search(text) for text in texts):
                    found |= {(name, dotted(t)) for t in node.targets}
    assert found == RUNS_MODEL_CODE


def test_the_python_tool_runs_isolated_with_a_scrubbed_environment():
    from lowtune.infer import tools

    source = (SRC / "infer" / "tools.py").read_text(encoding="utf-8")
    assert '"-I"' in source and "RLIMIT_AS" in tools.LAUNCHER and "timeout=timeout" in source
    assert not {"HF_TOKEN", "SERPER_API_KEY", "OPENAI_API_KEY"} & set(tools.SAFE_ENV)


def test_weights_are_never_unpickled():
    bad = []
    for name, tree in parsed():
        for call in calls(tree):
            func = dotted(call.func)
            if func.endswith("torch.load") and not is_true(keyword(call, "weights_only")):
                bad.append(f"{name}:{call.lineno} torch.load without weights_only=True")
            if func.endswith("np.load") and is_true(keyword(call, "allow_pickle")):
                bad.append(f"{name}:{call.lineno} np.load(allow_pickle=True)")
            if func == "yaml.load" and dotted(keyword(call, "Loader") or ast.Name("?")) != "_Loader":
                bad.append(f"{name}:{call.lineno} yaml.load without the safe loader")
            if tuple(func.rsplit(".", 1)[-2:]) in FORBIDDEN_ATTRS or func.endswith("register_for_checkpointing"):
                bad.append(f"{name}:{call.lineno} {func}")
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{name}:{node.lineno} import {n}" for n in names if n.split(".")[0] in FORBIDDEN_MODULES]
    assert not bad, bad


def test_the_yaml_loader_is_a_safe_loader():
    import yaml

    from lowtune import config
    from lowtune.errors import UserError

    assert issubclass(config._Loader, yaml.SafeLoader)
    with pytest.raises(UserError, match="not valid YAML"):
        config.parse_yaml("x: !!python/object/apply:os.system ['true']")


def test_no_shell():
    bad = [f"{name}:{c.lineno}" for name, tree in parsed() for c in calls(tree) if is_true(keyword(c, "shell"))]
    assert not bad, bad


def test_trust_remote_code_is_only_ever_passed_through():
    bad = []
    for name, tree in parsed():
        for call in calls(tree):
            value = keyword(call, "trust_remote_code")
            if value is not None and isinstance(value, ast.Constant) and value.value is not False:
                bad.append(f"{name}:{call.lineno} trust_remote_code={value.value!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                    + node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code" and default is not None and not (
                            isinstance(default, ast.Constant) and default.value is False):
                        bad.append(f"{name}:{node.lineno} {node.name}(trust_remote_code={ast.unparse(default)})")
    assert not bad, bad


def test_trust_remote_code_is_off_unless_asked():
    from lowtune.cli import build_parser
    from lowtune.config import ModelSection

    assert ModelSection().trust_remote_code is False
    parser = build_parser()
    for verb in (["chat", "x"], ["web", "x"], ["serve", "x"]):
        assert parser.parse_args(verb).trust_remote_code is False
        assert parser.parse_args([*verb, "--trust-remote-code"]).trust_remote_code is True


def test_the_scan_catches_what_it_forbids(tmp_path, monkeypatch):
    """The scan is not vacuous: a module with each forbidden pattern is reported."""
    sample = tmp_path / "lowtune" / "bad.py"
    sample.parent.mkdir()
    sample.write_text("import pickle\nimport torch\neval('1')\ntorch.load('w.pt')\n"
                      "f(trust_remote_code=True)\nimport subprocess\nsubprocess.run('x', shell=True)\n",
                      encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "FILES", [sample])
    monkeypatch.setattr(sys.modules[__name__], "SRC", sample.parent)
    for check in (test_no_eval_or_exec_of_data_or_model_output, test_weights_are_never_unpickled, test_no_shell,
                  test_trust_remote_code_is_only_ever_passed_through):
        with pytest.raises(AssertionError):
            check()

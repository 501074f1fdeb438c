"""Imports flow downward only (docs/architecture.md): cli > infer, export, train > data, templates, models > config; and no
two modules import each other, directly or round a longer loop (imports inside functions count too)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lowtune"
LAYERS = {
    "errors": 0, "config": 0, "runs": 0,
    "templates": 1, "data": 1, "models": 1, "generation": 1, "kernels": 1,
    "train": 2, "infer": 2, "export": 2,
    "cli": 3, "doctor": 3, "demo": 3, "__main__": 3,
}


def unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_units(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lowtune" and len(parts) > 1:
                yield parts[1], node.lineno


def test_every_module_has_a_layer():
    units = {unit_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(LAYERS), units - set(LAYERS)


def test_imports_flow_downward():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of(path)
        if unit == "__init__":
            continue
        for target, line in imported_units(path):
            if target == unit or target == "__init__" or target == "__version__":
                continue
            mine, theirs = LAYERS[unit], LAYERS.get(target, -1)
            stage_to_stage = mine == theirs == 2  # train, infer and export stay independent
            if theirs > mine or stage_to_stage:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports lowtune.{target}")
    assert not bad, "\n".join(bad)


def module_name(path: Path) -> str:
    parts = ("lowtune", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]):
    """Every lowtune module `path` imports anywhere in its text (module level, functions, TYPE_CHECKING blocks)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import submodule` imports the submodule; `from module import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        yield from (t for t in targets if t in known and t != here)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import loop [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":  # back on the current path: a loop
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (loop := visit(nxt)):
                return loop
        state[node] = "done"
        trail.pop()
        return []

    for start in sorted(graph):
        if start not in state and (loop := visit(start)):
            return loop
    return []


def import_graph() -> dict[str, set[str]]:
    paths = list(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): set(imported_modules(p, known)) for p in paths}


def test_no_import_cycles():
    loop = find_cycle(import_graph())
    assert not loop, "import cycle: " + " -> ".join(loop)


def test_cycle_finder_sees_loops_inside_a_package_and_through_functions():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "lowtune.data.messages" in graph["lowtune.data.formats"]  # within one package
    assert "lowtune.train.shard" in graph["lowtune.train.checkpoint"]

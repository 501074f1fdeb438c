"""Imports flow downward only (DESIGN.md): cli > infer, export, train > data, templates, models > config."""

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

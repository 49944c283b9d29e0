"""The package layout: imports point down the pipeline, never up or across stages.

Read from the source with ast, every import counted (module level and inside functions alike), so a
function-level import cannot dodge the rule.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_app"

# Top to bottom; a unit may import its own package and any unit of a lower layer, nothing else.
LAYERS = [
    {"__main__"},
    {"cli"},
    {"demo", "smoke"},
    {"pipeline", "chat", "push"},
    {"eval"},
    {"train", "merge", "serve"},
    {"plan", "data"},
    {"model"},
    {"hub"},
    {"run"},
    {"recipe", "machine"},
    {"console", "errors", "__init__"},
]
RANK = {unit: depth for depth, layer in enumerate(LAYERS) for unit in layer}
# Modules that import parts of the package inside functions, to keep `qlora-app --help` and vLLM's process fast.
DEFERRED = {"cli.py", "pipeline.py", "push.py", "chat.py", "train/stage.py", "train/launch.py", "train/rank.py",
            "merge/stage.py", "merge/verify.py", "serve/stage.py", "serve/target.py", "hub/card.py",
            "machine/doctor.py", "model/tiny.py", "plan/layout.py", "train/attention.py",
            "eval/stage.py", "eval/generate.py", "train/preference.py"}


def unit_of(module: str) -> str:
    """qlora_app.train.stage -> train; qlora_app.cli -> cli."""
    return module.split(".")[1] if "." in module else "__init__"


def imported_units(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_app"):
            if node.module == "qlora_app":
                yield from ((alias.name, node) for alias in node.names)
            else:
                yield unit_of(node.module), node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qlora_app."):
                    yield unit_of(alias.name), node


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def own_unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_belongs_to_a_layer():
    assert {own_unit(p) for p in sources()} <= set(RANK)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    mine = own_unit(path)
    wrong = [f"line {node.lineno}: {mine} imports {unit}" for unit, node in imported_units(ast.parse(path.read_text()))
             if unit != mine and unit in RANK and RANK[unit] <= RANK[mine]]
    assert not wrong, f"{path.relative_to(PACKAGE)} imports up or across: {wrong}"


def test_function_level_imports_are_declared():
    """Only the modules listed defer imports of the package; any other one does it to dodge a cycle."""
    found = set()
    for path in sources():
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            if any(True for _ in imported_units(func)):
                found.add(str(path.relative_to(PACKAGE)))
    assert found <= DEFERRED, f"function-level imports of qlora_app in {sorted(found - DEFERRED)}"


def test_each_package_says_its_job():
    for init in PACKAGE.glob("*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init.parent.name}/__init__.py has no docstring"

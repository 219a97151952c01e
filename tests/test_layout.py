"""The house stays readable: the top of the package holds only the public entry points, every
subpackage says what it is for, no module grows past about 450 lines and no function past 60
(the argparse builder aside: one long list of options reads best in one place)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cae"
MODULES = sorted(ROOT.rglob("*.py"))
MAX_LINES, MAX_FUNCTION = 450, 60
LONG_FUNCTIONS_ALLOWED = {("cae/arguments.py", "build_parser")}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT.parent))


def test_only_entry_points_at_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "arguments.py", "cli.py", "export.py"], top


@pytest.mark.parametrize("package", sorted(p.parent.name for p in ROOT.glob("*/__init__.py")))
def test_every_subpackage_says_what_it_is_for(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc) > 40, package


def _too_long(text: str, where: str) -> list[str]:
    """The functions of a module's ``text`` longer than ``MAX_FUNCTION`` lines."""
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION and (where, node.name) not in LONG_FUNCTIONS_ALLOWED:
                long.append(f"{node.name} ({lines} lines)")
    return long


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_modules_and_functions_stay_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{_rel(path)}: split it by job"
    long = _too_long(text, _rel(path))
    assert not long, f"{_rel(path)}: {long}"


def test_the_size_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    assert _too_long(f"def f():\n{body}\n", "m.py") == [f"f ({MAX_FUNCTION + 1} lines)"]
    assert _too_long(f"def build_parser():\n{body}\n", "cae/arguments.py") == []

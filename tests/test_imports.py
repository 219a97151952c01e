"""The data flow is one way (design.md): no import cycles between modules, no module
imports one of a later layer, the core never imports Ray, nothing that reads a finished run
imports Ray (even through another module), and the library never imports its command line.

Every module of every subpackage is looked at; an import counts as an edge unless it is only
under ``if TYPE_CHECKING:`` (one that is also imported at run time is an edge)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "cae"


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}
PACKAGES = {_name(p) for p in ROOT.rglob("__init__.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path) -> set[str]:
    """The modules a file imports at run time (at any level of the file), each import of a
    name from a package counted as the submodule where one of that name exists."""
    deps = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            deps.add(node.module)
            deps |= {f"{node.module}.{a.name}" for a in node.names}
    return deps


GRAPH = {mod: _imports(path) for mod, path in MODULES.items()}


def _edges() -> dict[str, set[str]]:
    """Project module -> the project modules it imports. A package's ``__init__`` is not a
    target of its own: ``from cae.report import figures`` names the submodule."""
    return {mod: {d for d in deps if d in MODULES and d != mod and d not in PACKAGES}
            for mod, deps in GRAPH.items()}


def test_every_subpackage_is_seen():
    assert {"cae.config", "cae.model", "cae.data", "cae.train", "cae.schedule", "cae.run",
            "cae.sweep", "cae.results", "cae.report"} <= PACKAGES
    assert "cae.train.trainer" in MODULES and "cae.run.tunefiles" in MODULES


def test_an_edge_imported_at_run_time_and_under_type_checking_counts(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from cae.config.trial import TrialConfig\n"
                    "def f():\n    from cae.config.trial import TrialConfig\n")
    assert "cae.config.trial" in _imports(path)
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from cae.config.trial import TrialConfig\n")
    assert "cae.config.trial" not in _imports(path)


def test_no_import_cycles():
    edges = _edges()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod, [mod])


def _imports_ray(deps: set[str]) -> bool:
    return any(d == "ray" or d.startswith("ray.") for d in deps)


CORE = tuple(m for m in MODULES if m.startswith(("cae.config", "cae.model", "cae.data",
                                                  "cae.train")))


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_ray_or_the_cli(module):
    deps = GRAPH[module]
    assert not _imports_ray(deps), module
    assert not {d for d in deps if d == "cae.cli" or d.startswith("cae.sweep")}, module


# What opens a finished run: it must work where Ray is absent or of another version, so
# neither it nor anything it imports (at any depth, lazily included) imports Ray.
READERS = ("cae.export", "cae.results.tables", "cae.results.status", "cae.results.finish",
           "cae.results.baselines", "cae.report.page", "cae.report.pictures", "cae.run.state",
           "cae.run.directory", "cae.run.tunefiles")


def _closure(module: str) -> set[str]:
    edges, seen, todo = _edges(), set(), [module]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(edges[mod])
    return seen


@pytest.mark.parametrize("module", READERS)
def test_readers_of_a_run_never_import_ray(module):
    importers = sorted(m for m in _closure(module) if _imports_ray(GRAPH[m]))
    assert not importers, f"{module} reaches Ray through {importers}"


def test_private_ray_names_only_in_the_checked_internals():
    """A name of Ray's that starts with an underscore (a module, a class's attribute, a
    hook a cae class overrides) is used only in ``cae.sweep.internals``, where each is
    checked against Ray's source when a sweep starts."""
    private = {"_supports_buffered_results", "_ot_study", "_mark_trial_to_checkpoint",
               "_tune_controller", "_local_tuner", "_private"}
    found = []
    for mod, path in MODULES.items():
        if mod == "cae.sweep.internals":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = (node.attr if isinstance(node, ast.Attribute) else
                    node.id if isinstance(node, ast.Name) else
                    node.name if isinstance(node, ast.FunctionDef) else None)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "ray") and ("._" in node.module or any(a.name.startswith("_")
                                                            for a in node.names)):
                found.append(f"{mod}: from {node.module} import ...")
            elif name in private:
                found.append(f"{mod}: {name}")
    assert not found, found


def test_the_library_never_imports_the_cli():
    for mod, deps in GRAPH.items():
        if mod != "cae.cli":
            assert "cae.cli" not in deps, mod


# The layers of design.md's data flow, first to last: a module imports only from its own
# layer and the ones before it. Every module of the package has a place here (a package
# name stands for all its modules, unless one of them is placed by its own name).
LAYERS = (
    ("facts", ("cae.config.errors", "cae.config.catalog", "cae.config.presets",
               # torch-free: a model's shapes and a user's images are part of validating it
               "cae.model.plan", "cae.data.imagefiles", "cae.data.imagefolder",
               "cae.data.userdata")),
    ("config", ("cae.config", "cae.model.memory", "cae.run.diskspace", "cae.run.record",
                "cae.run.outcomes", "cae.train.packing")),
    ("core", ("cae.model", "cae.data", "cae.train")),
    ("plan and run directory", ("cae.sweep.plan", "cae.sweep.dryrun", "cae.sweep.extension",
                                "cae.run")),
    ("results", ("cae.results.tables", "cae.results.learning")),
    ("readers", ("cae.results", "cae.report", "cae.export")),
    # tracker runs from the tables' rows and from the driver's results; the Ray Tune
    # callback that hands those over runs in the sweep
    ("tracking", ("cae.track",)),
    ("ray", ("cae.schedule", "cae.sweep", "cae.track.callback")),
    ("driver", ("cae.sweep.driver", "cae.sweep.extend")),
    ("command line", ("cae.cli", "cae.arguments", "cae")),
)


def _layer(module: str) -> int:
    """The layer of the most specific entry naming ``module`` or a package above it."""
    best, depth = None, -1
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (module.startswith(m + ".") and m != "cae"):
                if m.count(".") > depth:
                    best, depth = i, m.count(".")
    if best is None:
        raise KeyError(module)
    return best


def test_every_module_has_a_layer():
    missing = []
    for m in MODULES:
        try:
            _layer(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"place these in LAYERS: {missing}"


def test_no_module_imports_a_later_layer():
    upward = []
    for mod, deps in _edges().items():
        for dep in deps:
            if _layer(dep) > _layer(mod):
                upward.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {dep} "
                              f"({LAYERS[_layer(dep)][0]})")
    assert not upward, "\n".join(upward)


def test_the_top_of_the_package_holds_only_entry_points():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 10, top

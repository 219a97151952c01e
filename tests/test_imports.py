"""The data flow is one way (design.md): no import cycles between modules, no module
imports one of a later layer, the core never imports Ray, and the library never imports its
command line."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cae", "cae.report")
CORE = ("cae.catalog", "cae.presets", "cae.arch", "cae.config", "cae.memory", "cae.models",
        "cae.data", "cae.tasks", "cae.train", "cae.baselines", "cae.packs", "cae.stacked",
        "cae.fused")


def _module_imports() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (at any level of the file)."""
    graph = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg.replace(".", "/")).glob("*.py"):
            name = f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module)
                    deps |= {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = deps
    return graph


def _path(module: str) -> Path:
    base = REPO.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _is_type_checking_only(path: Path, module: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module == module:
                    return True
    return False


def _edges() -> dict[str, set[str]]:
    graph = _module_imports()
    edges = {}
    for mod, deps in graph.items():
        path = _path(mod)
        # ``from cae.report import figures`` names the submodule; the package itself only
        # re-exports, so it is not an edge of its own
        edges[mod] = {d for d in deps if d in graph and d != mod and d not in PACKAGES
                      and not _is_type_checking_only(path, d)}
    return edges


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


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_ray_or_the_cli(module):
    deps = _module_imports().get(module)
    if deps is None:
        pytest.skip(f"{module} does not exist")
    assert not {d for d in deps if d == "ray" or d.startswith("ray.")}, module
    assert "cae.cli" not in deps and "cae.sweep" not in deps


def test_the_library_never_imports_the_cli():
    for mod, deps in _module_imports().items():
        if mod != "cae.cli":
            assert "cae.cli" not in deps, mod


# The layers of design.md's data flow, first to last: a module imports only from its own
# layer and the ones before it. Every module of the package has a place here.
LAYERS = (
    ("spec", ("cae.errors", "cae.catalog", "cae.presets", "cae.arch", "cae.config", "cae.spec",
              "cae.memory", "cae.diskspace", "cae.record", "cae.outcomes", "cae.ray_internals",
              # a user's images: their shapes are part of validating a config (torch-free)
              "cae.userdata", "cae.imagefolder", "cae.imagefiles",
              # which trials fuse, and a pack's memory (torch-free)
              "cae.packs")),
    ("core", ("cae.models", "cae.data", "cae.tasks", "cae.train", "cae.stacked", "cae.fused")),
    ("plan and run directory", ("cae.plan", "cae.dryrun", "cae.rundir", "cae.checkpoints",
                                "cae.runstate", "cae.lease", "cae.packfiles")),
    ("results", ("cae.results",)),
    ("readers", ("cae.baselines", "cae.report", "cae.finish", "cae.status", "cae.export")),
    ("ray", ("cae.halving", "cae.schedulers", "cae.search", "cae.trainable", "cae.sweep",
             "cae.cluster", "cae.progress", "cae.livereport", "cae.guard", "cae.signals",
             "cae.packplan", "cae.packtrial")),
    ("driver", ("cae.driver",)),
    ("command line", ("cae.cli", "cae.arguments", "cae")),
)


def _layer(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m != "cae"):
            return i
    if module == "cae":
        return len(LAYERS) - 1
    raise KeyError(module)


def test_every_module_has_a_layer():
    missing = [m for m in _module_imports() if not _safe_layer(m)]
    assert not missing, f"place these in LAYERS: {missing}"


def _safe_layer(module: str) -> bool:
    try:
        _layer(module)
    except KeyError:
        return False
    return True


def test_no_module_imports_a_later_layer():
    upward = []
    for mod, deps in _edges().items():
        for dep in deps:
            if _safe_layer(mod) and _safe_layer(dep) and _layer(dep) > _layer(mod):
                upward.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {dep} "
                              f"({LAYERS[_layer(dep)][0]})")
    assert not upward, "\n".join(upward)

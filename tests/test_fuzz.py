"""Mutated shipped specs never crash the dry run: every one exits 0 or 2, with one message
and no traceback, within a few seconds (hypothesis generates the mutations)."""

import copy
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cae.cli import main

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
SPECS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(SWEEPS.glob("*.yaml"))
         if "space" in yaml.safe_load(p.read_text())}

# Values a careless or hostile spec may hold anywhere.
WEIRD = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8),
    st.integers(min_value=-10**12, max_value=10**12),
    st.sampled_from([0, -1, 1, 2**31, 10**9, 1e308, float("inf"), float("nan"), -0.5]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=5),
    st.dictionaries(st.sampled_from(["grid", "choice", "uniform", "randint", "x"]),
                    st.lists(st.integers(-3, 10**7), max_size=4), max_size=2),
)


def _paths(node, prefix=()):
    """Every (path, value) inside a nested spec."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@st.composite
def mutated_specs(draw):
    name = draw(st.sampled_from(sorted(SPECS)))
    spec = copy.deepcopy(SPECS[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(spec) if p]
        kind = draw(st.sampled_from(["replace", "unknown_key", "delete"]))
        path = draw(st.sampled_from(paths))
        if kind == "replace":
            _set(spec, path, draw(WEIRD))
        elif kind == "delete":
            parent = spec
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict):
                del parent[path[-1]]
        else:
            target = spec
            for key in path[:-1]:
                target = target[key]
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=6))] = draw(WEIRD)
        paths = [p for p, _ in _paths(spec) if p]
        if not paths:
            break
    return yaml.safe_dump(spec, allow_unicode=True)


BROKEN_YAML = st.sampled_from([
    "", "   \n", "- 1\n- 2\n", "name: [unclosed\n", "space: {a: 1\n", "\t\tname: x\n",
    "trial: 5\n", "space: [1, 2]\n", "space: {model.latent_dim: {grid: 7}}\n",
    "trial: {model: {preset: nope}}\n", "name: 'x'\nname: 'y'\n", "!!python/object:os.system x",
    "trial:\n  model:\n    channels: [[1]]\n", "space: {variant: {grid: [1, 2]}}\n",
    "space: {'': 3}\n", "space: {model..x: 3}\n", "num_samples: 1e400\n",
])


def _dry_run(tmp_path: Path, text: str) -> tuple[int, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        rc = main(["sweep", str(path), "--dry-run", "--storage", str(tmp_path / "runs")])
    return rc, err.getvalue()


def _check(rc: int, err: str, text: str) -> None:
    assert rc in (0, 2), f"exit {rc} for spec:\n{text}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, f"{err}\nspec:\n{text}"
    if rc == 2:
        assert err.startswith("cae: error:"), err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=mutated_specs())
def test_mutated_shipped_specs_exit_0_or_2(tmp_path, text):
    _check(*_dry_run(tmp_path, text), text)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=BROKEN_YAML)
def test_broken_yaml_exits_2(tmp_path, text):
    rc, err = _dry_run(tmp_path, text)
    _check(rc, err, text)
    assert rc == 2, f"exit {rc} for spec:\n{text}"


def test_fuzz_covers_the_shipped_specs():
    assert {"quickstart", "full_grid", "study_b_denoise"} <= set(SPECS)

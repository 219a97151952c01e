"""Model-based search (``search: {kind: optuna}``): the per-grid-point TPE searcher, its
refusals, the shipped spec on the sample, and a resume that goes on with the same studies."""

import glob
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cae.cli import main
from cae.config.spec import load_spec
from cae.sweep.internals import optuna_study

REPO = Path(__file__).resolve().parents[1]
OPTUNA = str(REPO / "sweeps" / "quickstart_optuna.yaml")
QUICK = str(REPO / "sweeps" / "quickstart.yaml")
AXES = {
    "model.latent_dim": ("grid", [4, 8]),
    "lr": ("loguniform", [1e-4, 1e-1]),
    "model.channels": ("choice", [[4, 8], [8, 16]]),
    "variant": ("choice", [{}, {"model.batchnorm": True}]),
    "batch_size": ("randint", [32, 256]),
    "patience": ("fixed", 2),
}


def _searcher(seed=0, samples=6, startup=2):
    from cae.schedule.search import GridTPESearcher

    return GridTPESearcher(AXES, samples, seed, startup)


def _loss(config: dict) -> float:
    """A made-up objective with its optimum near lr = 0.01."""
    import math

    return (math.log10(config["lr"]) + 2) ** 2 + 0.01 * config["model.latent_dim"]


def _run(searcher, ids, complete=True):
    configs = []
    for i in ids:
        config = searcher.suggest(f"t{i}")
        configs.append(config)
        if complete:
            searcher.on_trial_complete(f"t{i}", {"best_val_loss": _loss(config), "epoch": 3,
                                                 "stop_reason": "max_epochs"})
    return configs


# ---- the searcher --------------------------------------------------------------------------


def test_each_grid_point_gets_its_budget_round_robin_with_whole_configs():
    s = _searcher()
    configs = _run(s, range(12))
    from ray.tune.search import Searcher

    assert s.suggest("t12") == Searcher.FINISHED
    latents = [c["model.latent_dim"] for c in configs]
    assert sorted(latents) == [4] * 6 + [8] * 6
    assert latents[0] != latents[1] and latents[:2] * 6 == latents  # k-th of each, then k+1-th
    for c in configs:
        assert set(c) == set(AXES) | {"repeat"}
        assert c["patience"] == 2 and 1e-4 <= c["lr"] <= 1e-1
        assert c["model.channels"] in ([4, 8], [8, 16])
        assert c["variant"] in ({}, {"model.batchnorm": True})
        assert isinstance(c["batch_size"], int) and 32 <= c["batch_size"] < 256
    assert sorted(c["repeat"] for c in configs) == sorted(list(range(6)) * 2)
    for point, study in s.studies():
        assert len(study.trials) == 6  # one study per grid point, only its own trials
        assert {t.state.name for t in study.trials} == {"COMPLETE"}


def test_seeded_and_learning():
    first, again, other = _searcher(0), _searcher(0), _searcher(1)
    a, b, c = _run(first, range(12)), _run(again, range(12)), _run(other, range(12))
    assert a == b  # the same seed and the same results: the same proposals
    assert a != c
    # after its random start, TPE proposes learning rates nearer the optimum (0.01)
    import math

    s = _searcher(0, samples=40, startup=5)
    configs = _run(s, range(80))
    dist = [abs(math.log10(x["lr"]) + 2) for x in configs]
    assert sum(dist[-20:]) / 20 < sum(dist[:10]) / 10


def test_save_and_restore_go_on_as_if_never_interrupted(tmp_path):
    whole, cut = _searcher(3), _searcher(3)
    expected = _run(whole, range(10))
    _run(cut, range(5))
    running = cut.suggest("t5")  # proposed, not finished when the sweep stopped
    cut.save(str(tmp_path / "state.pkl"))
    restored = _searcher(99)  # Tune rebuilds the searcher, then restores its state
    restored.restore(str(tmp_path / "state.pkl"))
    assert running == expected[5]
    restored.on_trial_complete("t5", {"best_val_loss": _loss(running), "epoch": 3,
                                      "stop_reason": "max_epochs"})
    assert _run(restored, range(6, 10)) == expected[6:]


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sets, message", [
    (["scheduler.kind=sha"], "cannot learn under scheduler.kind 'sha'"),
    (["space.lr=0.003", "space.weight_decay=0.0", "space.model.dropout=0.1"],
     "this space has none"),
])
def test_refusals(sets, message, capsys):
    argv = ["sweep", OPTUNA, "--dry-run"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cae: error:") and message in err and "Traceback" not in err


def test_optuna_missing_is_a_user_error(monkeypatch, capsys):
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name == "optuna":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    assert main(["sweep", OPTUNA, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "needs the optuna package >= 3.6 (it is not installed)" in err
    assert "pip install 'optuna>=3.6'" in err


def test_dry_run_says_how_the_search_runs(capsys):
    assert main(["sweep", OPTUNA, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "24 trials (2 grid points x 12 samples)" in out
    assert "Optuna's TPE, one search per grid point (its first 4 trials at random)" in out
    spec = load_spec(OPTUNA)
    assert spec.search.kind == "optuna" and spec.scheduler.stratify == ["model.latent_dim"]


# ---- real sweeps -----------------------------------------------------------------------------

SMALL = ["--set", "trial.data.train_limit=600", "--set", "trial.max_epochs=3",
         "--set", "num_samples=5"]


def _studies(run_dir: Path) -> list:
    """The grid points and their Optuna studies, from the searcher state Tune saved last."""
    newest = sorted(glob.glob(str(run_dir / "searcher-state-*.pkl")))[-1]
    with open(newest, "rb") as f:
        state = pickle.load(f)
    return [(p, optuna_study(sub)) for p, sub in zip(state["_points"], state["_subs"])]


@pytest.mark.slow
def test_the_shipped_optuna_spec_on_the_sample(tmp_path):
    assert main(["sweep", OPTUNA, "--storage", str(tmp_path), "--name", "o", *SMALL,
                 "--no-report"]) == 0
    trials = pd.read_parquet(tmp_path / "o" / "trials.parquet")
    assert len(trials) == 10 and set(trials["status"]) == {"TERMINATED"}
    for latent, group in trials.groupby("model.latent_dim"):
        assert len(group) == 5 and group["lr"].nunique() == 5
        assert sorted(group["repeat"]) == [0, 1, 2, 3, 4]
        assert group["epochs"].max() == 3  # each latent size's best trained to the end
    assert trials["lr"].between(0.0003, 0.03).all()
    assert trials["model.dropout"].between(0.0, 0.3).all()
    assert (trials["stop_reason"] == "asha").any()
    studies = _studies(tmp_path / "o")
    assert sorted(p["model.latent_dim"] for p, _ in studies) == [8, 32]
    for point, study in studies:
        # TPE was told every trial's end: complete (ended by itself) or pruned (by ASHA)
        told = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(told) == 5 and any(t.state.name == "COMPLETE" for t in told)
        mine = trials[trials["model.latent_dim"] == point["model.latent_dim"]]
        assert sorted(round(t.params["lr"], 12) for t in told) == sorted(mine["lr"].round(12))
        for t in told:
            row = mine[mine["lr"].round(12) == round(t.params["lr"], 12)].iloc[0]
            assert (t.state.name == "PRUNED") == (row["stop_reason"] == "asha")


def _finished_trials(run_dir: Path) -> set[str]:
    """The trial folders whose last result is the trial's end."""
    out = set()
    for path in run_dir.glob("run_trial_*/result.json"):
        lines = path.read_text().splitlines()
        if lines and "stop_reason" in lines[-1]:
            out.add(path.parent.name)
    return out


@pytest.mark.slow
def test_resume_goes_on_with_the_same_studies(tmp_path):
    """Killed mid-way, then `cae resume`: the searcher's state is restored from the run
    directory, so the budget is not spent twice and TPE keeps what it had learnt."""
    run_dir = tmp_path / "r"
    spec = yaml.safe_load(Path(OPTUNA).read_text())
    spec["scheduler"] = {"kind": "fifo"}
    spec["space"]["model.latent_dim"] = {"grid": [8]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cae.cli", "sweep", str(path), "--storage", str(tmp_path),
         "--name", "r", "--set", "trial.data.train_limit=1500", "--set", "trial.max_epochs=3",
         "--set", "trial.patience=null", "--set", "num_samples=10"],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(_finished_trials(run_dir)) < 3:
        time.sleep(0.2)
    time.sleep(1.5)  # let Ray Tune save its experiment (and searcher) state once more
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished_trials(run_dir)
    told = [t.params["lr"] for t in _studies(run_dir)[0][1].trials
            if t.state.name == "COMPLETE"]
    assert 3 <= len(before) < 10 and len(told) >= 1, "the sweep should have been interrupted"

    assert main(["resume", str(run_dir), "--no-report"]) == 0
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 10 and set(trials["status"]) == {"TERMINATED"}
    assert sorted(trials["repeat"]) == list(range(10))  # the budget, each proposal once
    assert before <= set(trials["trial_dir"])
    [(_, study)] = _studies(run_dir)
    assert len(study.trials) == 10  # one study from the first session on, not a new one
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert set(told) <= {t.params["lr"] for t in study.trials}

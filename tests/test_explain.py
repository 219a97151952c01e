"""Explaining a sweep: which settings mattered (importance), which winners were still
learning (``still_improving``, ``cae extend``), and runs side by side (``cae compare``).

The fast tier checks each piece on made-up tables and on the recorded run; the slow tier
on real sweeps: one built to have a known answer (the learning rate decides the loss, the
evaluation batch size does not), a trial trained 4 epochs and extended by 4 against one
trained 8 in the first place (equal to the bit on the CPU), and a comparison page of two
small runs rendered in Chromium.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cae.cli import main
from cae.report.importance import importance_bars, importance_html
from cae.results.importance import (
    IMPORTANCE_FILE,
    OUTSIDE_NOTE,
    comparable_losses,
    importance,
    importance_text,
    min_trials,
)
from cae.results.learning import curve_facts, still_learning, still_learning_lines

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "tests" / "data" / "recorded-run"


# ---- still learning ----------------------------------------------------------------------


def test_a_falling_curve_cut_at_two_epochs_is_still_improving():
    facts = curve_facts([0.20, 0.15], 0.0, "max_epochs")
    assert facts["still_improving"] and facts["improvement_rate"] == pytest.approx(0.25)
    assert math.isnan(facts["remaining_gain"])  # two epochs say nothing about the level


def test_a_trial_stopped_by_patience_is_not_still_improving():
    # the last epochs got worse: patience stopped it, whatever came before
    assert not curve_facts([0.3, 0.2, 0.21, 0.22], 0.0, "patience")["still_improving"]
    # falling, but by less than its own min_delta per epoch: not an improvement
    assert not curve_facts([0.30, 0.29, 0.28], 0.05, "max_epochs")["still_improving"]
    # levelled off: less than 0.5% per epoch
    assert not curve_facts([0.3, 0.2, 0.2, 0.1999, 0.1998], 0.0, "max_epochs")[
        "still_improving"]


def test_what_is_left_extrapolates_shrinking_improvements():
    # improvements 0.5, 0.25, 0.125: halving, so 0.125 more is left below 1.125
    facts = curve_facts([2.0, 1.5, 1.25, 1.125], 0.0, "max_epochs")
    assert facts["remaining_gain"] == pytest.approx(0.125 / 1.125)
    assert math.isinf(curve_facts([2.0, 1.9, 1.7, 1.3], 0.0, "max_epochs")["remaining_gain"])


def _winners(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["trial_id", "latent_size", "best_val_loss", "epochs",
                                       "status", "stop_reason", "still_improving",
                                       "improvement_rate", "remaining_gain"])


def test_the_winners_still_improving_at_max_epochs_are_flagged_with_the_command():
    t = _winners([("x_1", 4, 0.10, 12, "TERMINATED", "max_epochs", True, 0.02, 0.1),
                  ("x_2", 4, 0.20, 12, "TERMINATED", "max_epochs", True, 0.05, math.inf),
                  ("x_3", 8, 0.05, 7, "TERMINATED", "patience", False, 0.0, 0.0),
                  ("x_4", 16, 0.04, 12, "TERMINATED", "max_epochs", False, 0.001, 0.0)])
    assert list(still_learning(t)["trial_id"]) == ["x_1"]  # the winner at 4 alone
    lines = still_learning_lines(t, "runs/r")
    assert "latent_size 4 (trial 1: -2.0%/epoch, ~10% left)" in lines[0]
    assert lines[1].strip() == "train them on: cae extend runs/r --epochs 12 --best-per " \
                               "latent_size"


# ---- importance --------------------------------------------------------------------------

SPEC = {"trial": {}, "space": {"lr": {"loguniform": [1e-5, 1e-2]},
                               "eval_batch_size": {"grid": [50, 100, 200]}}}


def _made_up(n: int, seed: int = 0, stop: str = "max_epochs") -> tuple:
    """``n`` trials whose loss is decided by lr (with noise), not by eval_batch_size."""
    rng = np.random.default_rng(seed)
    lr = 10 ** rng.uniform(-5, -2, n)
    trials = pd.DataFrame({
        "trial_id": [f"t_{i}" for i in range(n)], "lr": lr,
        "eval_batch_size": np.tile([50, 100, 200], n)[:n],
        "best_val_loss": 0.1 + (np.log10(lr) + 5) ** 2 / 100 + rng.normal(0, 1e-3, n),
        "epochs": 4, "status": "TERMINATED", "stop_reason": stop})
    epochs = pd.DataFrame({"trial_id": np.repeat(trials["trial_id"], 4), "epoch":
                           np.tile([1, 2, 3, 4], n), "val_loss": 1.0})
    return trials, epochs


def test_importance_ranks_the_deciding_axis_first_with_an_interval():
    trials, epochs = _made_up(40)
    trials["best_val_loss"] = -trials["best_val_loss"]  # lower is better: the highest lr
    frame = importance(trials, epochs, SPEC, n_boot=60)
    assert list(frame["axis"]) == ["lr", "eval_batch_size"]
    lr, inert = frame.iloc[0], frame.iloc[1]
    assert lr["importance"] > 0.8 and lr["low"] > inert["high"]
    # the intervals as drawn: the decisive axis's excludes the idle axis's estimate
    assert lr["low"] > inert["importance"] and inert["high"] < lr["importance"]
    assert frame["importance"].sum() == pytest.approx(1.0)
    assert set(frame["trials_used"]) == {40} and "PED-ANOVA" in frame["method"].iloc[0]
    assert "trained to its own end" in frame["budget"].iloc[0]


def test_too_few_trials_give_a_note_not_a_number():
    trials, epochs = _made_up(min_trials() - 1)
    frame = importance(trials, epochs, SPEC)
    assert frame["importance"].isna().all() and len(frame) == 2
    assert f"at least {min_trials()}" in frame["note"].iloc[0]
    assert f"this run has {min_trials() - 1}" in frame["note"].iloc[0]


def _ranked_by(trials: pd.DataFrame, axis: str, seed: int) -> np.ndarray:
    """Losses decided by one axis (lr: the higher the better; eval_batch_size: 50 best)."""
    noise = np.random.default_rng(seed).normal(0, 1e-3, len(trials))
    if axis == "lr":
        return 1.0 - (np.log10(trials["lr"].to_numpy()) + 5) / 3 + noise
    return trials["eval_batch_size"].to_numpy() / 200 + noise


def test_trials_stopped_by_the_scheduler_are_compared_at_the_rung_all_reached():
    """Up to epoch 2 lr decides the ranking, after it eval_batch_size does (and every
    later loss is lower): a budget other than the rung all trials reached ranks the wrong
    axis first."""
    trials, _ = _made_up(30)
    trials.loc[:9, ["stop_reason", "epochs"]] = ["sha", 2]
    early, late = _ranked_by(trials, "lr", 1), _ranked_by(trials, "eval_batch_size", 2) - 2
    epochs = pd.DataFrame({"trial_id": np.repeat(trials["trial_id"], 4),
                           "epoch": np.tile([1, 2, 3, 4], 30),
                           "val_loss": np.stack([early + 0.1, early, late + 0.1, late], 1)
                           .reshape(-1)})
    trials["best_val_loss"] = late  # the trials trained on: their best, at epoch 4
    trials.loc[:9, "best_val_loss"] = early[:10]
    frame = importance(trials, epochs, SPEC, n_boot=20)
    assert "up to epoch 2" in frame["budget"].iloc[0]
    assert list(frame["axis"]) == ["lr", "eval_batch_size"]
    assert frame["importance"].iloc[0] > 0.8


def test_a_budget_at_the_first_rung_says_it_compares_the_first_epoch():
    trials, epochs = _made_up(30)
    trials.loc[:9, ["stop_reason", "epochs"]] = ["asha", 1]
    frame = importance(trials, epochs, SPEC, n_boot=20)
    assert "after one epoch only" in frame["budget"].iloc[0]


def test_trials_that_errored_or_diverged_count_as_worse_than_every_finished_one():
    """The failed trials had reached the lowest losses before they failed (the high
    learning rates): kept, they would make lr look decisive the wrong way round."""
    trials, epochs = _made_up(30)
    failed = trials["lr"] > 10 ** -2.5
    assert 2 <= failed.sum() <= 10
    trials.loc[failed, "best_val_loss"] = 0.01  # finite, and the best of all
    trials.loc[failed, ["status", "stop_reason"]] = ["ERROR", "error: diverged: val loss nan"]
    losses, _ = comparable_losses(trials, epochs)
    assert (losses[failed] > losses[~failed].max()).all()
    assert len(losses) == 30


def test_an_estimate_outside_its_interval_is_marked_and_explained():
    frame = pd.DataFrame({"axis": ["lr", "eval_batch_size"], "importance": [0.7, 0.3],
                          "low": [0.75, 0.1], "high": [0.9, 0.35], "ped_anova": [1.0, 0.4],
                          "method": "m", "budget": "b", "trials_used": 30, "note": ""})
    text = importance_text(frame)
    assert "0.70*(0.75-0.90)" in text and "0.30 (0.10-0.35)" in text
    assert text.splitlines()[-1].strip() == OUTSIDE_NOTE
    page = importance_html(frame)
    assert "0.70*" in page and "0.30*" not in page and "outside the interval" in page
    fig = importance_bars({"run": frame})
    assert list(fig.data[0].error_x.arrayminus) == [0.0, pytest.approx(0.2)]
    assert "outside its interval" in fig.data[0].customdata[0][2]


def test_status_prints_the_importance_or_why_there_is_none(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    assert main(["status", str(run), "--importance"]) == 0
    out = capsys.readouterr().out
    assert "importance of the swept axes" in out and "one swept axis" in out


def test_export_writes_the_importance_file(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    assert main(["export", str(run)]) == 0
    frame = pd.read_parquet(run / IMPORTANCE_FILE)
    assert list(frame["axis"]) == ["model.latent_dim"] and frame["note"].iloc[0]
    trials = pd.read_parquet(run / "trials.parquet")
    assert {"still_improving", "improvement_rate", "remaining_gain"} <= set(trials.columns)


# ---- extend: the new run's spec -----------------------------------------------------------


def test_the_extension_spec_reproduces_each_trial_with_more_epochs(tmp_path):
    from cae.config.points import trial_config
    from cae.run import directory as rundir
    from cae.run.state import point_key
    from cae.sweep.extend import _sources, extension_spec

    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    trials = pd.read_parquet(run / "trials.parquet")
    sources = _sources(str(run), [row for _, row in trials.iterrows()], None)
    spec, adopt, carried = extension_spec(rundir.load_run_spec(str(run)), sources, 3)
    assert spec.swept() == ["variant"] and spec.scheduler.kind == "fifo"
    points = spec.space["variant"]["grid"]
    assert len(points) == 2 and spec.trial["max_epochs"] == 2 + 3
    for s, mapping in zip(sources, points):
        want = {**s.config.model_dump(mode="json"), "max_epochs": 5}
        assert trial_config(spec.trial, {"variant": mapping}).model_dump(mode="json") == want
        assert adopt[point_key({"variant": mapping})] == s.location
        assert carried[point_key({"variant": mapping})] == s.epoch == 2
        assert s.location.endswith(s.row["trial_dir"])


def test_extend_refuses_a_schedule_fixed_by_max_epochs(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    for record in run.glob("*/trial.json"):
        data = json.loads(record.read_text())
        data["config"]["schedule"] = {"name": "cosine"}
        record.write_text(json.dumps(data))
    assert main(["extend", str(run), "--epochs", "2"]) == 2
    assert "cosine schedule" in capsys.readouterr().err


# ---- compare ------------------------------------------------------------------------------


def _decoded(value):
    """Plotly's typed arrays (``{"dtype": "f4", "bdata": base64}``) as lists."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    return value


def plotly_data(page: str) -> list[list[dict]]:
    """The traces of every Plotly figure embedded in an HTML page, arrays decoded."""
    figures, decoder = [], json.JSONDecoder()
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        traces, _ = decoder.raw_decode(page, m.end())
        figures.append([_decoded(t) for t in traces])
    return figures


def test_compare_draws_both_runs_and_lists_the_spec_differences(tmp_path, capsys):
    one, two = tmp_path / "first", tmp_path / "second"
    shutil.copytree(RECORDED, one)
    shutil.copytree(RECORDED, two)
    spec = yaml.safe_load((two / "spec.yaml").read_text())
    spec["trial"]["batch_size"] = 32
    (two / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "compare.html"
    assert main(["compare", str(one), str(two), "-o", str(out)]) == 0
    page = out.read_text()
    assert "trial.batch_size" in page and "not on one scale" not in page
    figures = plotly_data(page)
    best, curves = figures[0], figures[1]
    assert {t["name"] for t in best} == {"first: best", "first: PCA", "second: best",
                                         "second: PCA"}
    assert {t["name"] for t in curves} == {"first", "second"}


def test_load_runs_stacks_the_tables_for_the_notebook(tmp_path):
    import cae

    one, two = tmp_path / "a", tmp_path / "b"
    shutil.copytree(RECORDED, one)
    shutil.copytree(RECORDED, two)
    runs = cae.load_runs(one, two)
    assert list(runs.runs) == ["a", "b"] and set(runs.trials["run"]) == {"a", "b"}
    assert len(runs.epochs) == 2 * len(runs.runs["a"].epochs)
    assert runs.differences().empty and not runs.by_ratio
    assert set(runs.best()["run"]) == {"a", "b"}


# ---- slow: real sweeps -------------------------------------------------------------------


KNOWN = """
name: known
trial:
  data: {dataset: sample, train_limit: 400, test_limit: 100}
  model: {channels: [4], dense: [], latent_dim: 8}
  batch_size: 64
  max_epochs: 2
  patience: null
space:
  lr: {loguniform: [0.00001, 0.01]}
  eval_batch_size: {grid: [50, 100, 200]}
num_samples: 10
scheduler: {kind: fifo}
resources: {cpu: 1}
"""


@pytest.mark.slow
def test_a_sweep_with_a_known_answer_ranks_its_axes_right(tmp_path, capsys):
    """The learning rate (1e-5 to 1e-2) decides the loss after 2 epochs; the evaluation batch
    size changes nothing but rounding. Importance must say so, with intervals apart; the
    best trial, cut at 2 epochs on a falling curve, is still improving."""
    spec = tmp_path / "known.yaml"
    spec.write_text(KNOWN)
    assert main(["sweep", str(spec), "--storage", str(tmp_path), "--name", "known",
                 "--no-report", "--report-every", "0"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "known"
    frame = pd.read_parquet(run / IMPORTANCE_FILE)
    assert list(frame["axis"]) == ["lr", "eval_batch_size"], frame
    assert frame["low"].iloc[0] > frame["high"].iloc[1], frame
    assert frame["trials_used"].iloc[0] == 30
    trials = pd.read_parquet(run / "trials.parquet")
    best = trials.loc[trials["best_val_loss"].idxmin()]
    assert best["stop_reason"] == "max_epochs" and bool(best["still_improving"])
    assert "still improving at max_epochs" in out and f"cae extend {run}" in out
    assert main(["status", str(run), "--importance"]) == 0
    assert re.search(r"lr\s+\d\.\d\d[ *]\(", capsys.readouterr().out)


DIVERGING = """
name: diverging
trial:
  data: {dataset: sample, train_limit: 100, test_limit: 50}
  model: {channels: [4, 8], latent_dim: 8, output_activation: linear}
  optimizer: {name: sgd, momentum: 0.9}
  schedule: {name: step, warmup_epochs: 9, step_size: 100}
  max_epochs: 12
  patience: null
space:
  lr: {grid: [0.0001, 0.3, 40.0]}
num_samples: 2
scheduler: {kind: fifo}
max_failures: 0
resources: {cpu: 1}
"""


@pytest.mark.slow
def test_trials_that_diverge_in_a_real_sweep_count_as_its_worst(tmp_path, capsys):
    """SGD warmed up to a learning rate of 40 trains its first epochs, then its loss grows
    until it is infinite: those trials diverge after a finite best loss, and the loss that
    compares the trials (importance's) puts them behind every finished one."""
    spec = tmp_path / "diverging.yaml"
    spec.write_text(DIVERGING)
    assert main(["sweep", str(spec), "--storage", str(tmp_path), "--name", "d",
                 "--no-report", "--report-every", "0"]) == 0
    trials = pd.read_parquet(tmp_path / "d" / "trials.parquet")
    epochs = pd.read_parquet(tmp_path / "d" / "epochs.parquet")
    high = trials["lr"] == 40.0
    assert (trials.loc[high, "status"] == "ERROR").all(), trials
    assert trials.loc[high, "stop_reason"].str.contains("diverged").all()
    assert np.isfinite(trials.loc[high, "best_val_loss"]).all()
    assert (trials.loc[high, "epochs"] > 1).all()  # a finite best before it diverged
    assert (trials.loc[~high, "stop_reason"] == "max_epochs").all()
    losses, _ = comparable_losses(trials, epochs)
    assert len(losses) == 6
    assert (losses[high] > losses[~high].max()).all()


BASE = """
name: {name}
trial:
  data: {{dataset: sample, train_limit: 300, test_limit: 100}}
  model: {{channels: [4], dense: [16], bottleneck: dense, latent_dim: 4, dropout: 0.1}}
  batch_size: 32
  lr: 0.003
  max_epochs: {epochs}
  patience: null
space:
  variant: {{grid: {variants}}}
scheduler: {{kind: fifo}}
resources: {{cpu: 1}}
"""


def _sweep(tmp_path: Path, name: str, epochs: int, variants: str) -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(BASE.format(name=name, epochs=epochs, variants=variants))
    assert main(["sweep", str(spec), "--storage", str(tmp_path), "--name", name,
                 "--no-report", "--report-every", "0"]) == 0
    return tmp_path / name


@pytest.mark.slow
def test_four_epochs_then_four_more_equal_eight_to_the_bit(tmp_path, capsys):
    """A trial trained 4 epochs (patience off) and extended by 4 has every epoch's train
    and validation loss of the same trial trained 8 epochs in the first place; its record
    names where it came from and its curve holds the old epochs and the new. In the same
    run a trial stopped by patience (min_delta 1) is not still improving."""
    from cae.report.curves import loss_evolution

    eight = _sweep(tmp_path, "eight", 8, "[{}]")
    four = _sweep(tmp_path, "four", 4, "[{}, {patience: 1, min_delta: 1.0}]")
    trials4 = pd.read_parquet(four / "trials.parquet")
    stopped = trials4[trials4["stop_reason"] == "patience"]
    assert len(stopped) == 1 and not bool(stopped["still_improving"].iloc[0])
    cut = trials4[trials4["stop_reason"] == "max_epochs"].iloc[0]
    assert bool(cut["still_improving"]) and cut["epochs"] == 4
    assert main(["extend", str(four), "--epochs", "4", "--trial", cut["trial_id"],
                 "--name", "four-plus", "--no-report", "--report-every", "0"]) == 0
    out = capsys.readouterr().out
    assert "from epoch 4 to 8" in out
    # the counts are of the epochs this run trained, beside those it carried over
    assert any("1/1 done; 4/4 trial-epochs" in line for line in out.splitlines()), out
    assert "trial-epochs: 4 (besides the 4 the extended trials had trained)" in out, out
    ext = tmp_path / "four-plus"
    extension = json.loads((ext / "extends.json").read_text())
    assert list(extension["carried"].values()) == [4] and extension["more_epochs"] == 4
    assert main(["status", str(ext)]) == 0
    assert "trial-epochs: 4 of at most 4" in capsys.readouterr().out
    trials = pd.read_parquet(ext / "trials.parquet")
    assert len(trials) == 1 and trials["epochs"].iloc[0] == 8
    assert trials["extends"].iloc[0] == f"four/{cut['trial_dir']}"
    assert trials["extended_at"].iloc[0] == 4
    record = json.loads(next(ext.glob("*/trial.json")).read_text())
    assert record["extends"] == f"four/{cut['trial_dir']}" and record["config"]["max_epochs"] == 8
    got = pd.read_parquet(ext / "epochs.parquet").sort_values("epoch")
    want = pd.read_parquet(eight / "epochs.parquet").sort_values("epoch")
    assert list(got["epoch"]) == list(range(1, 9))
    for col in ("train_loss", "val_loss"):
        assert got[col].tolist() == want[col].tolist(), col  # to the bit
    fig = loss_evolution(trials, pd.read_parquet(ext / "epochs.parquet"))
    marks = [t for t in fig.data if t.name.startswith("extended from here")]
    assert len(marks) == 1 and list(marks[0].x) == [4]
    assert [len(t.x) for t in fig.data if t.name.startswith("#1 trial")] == [8, 8]


@pytest.mark.slow
def test_step_and_plateau_trials_extended_equal_the_longer_run_to_the_bit(tmp_path, capsys):
    """Trials of a step schedule (halved every 3 epochs) and of a plateau schedule (the rate
    times 0.7 after every epoch that is not better by min_delta 1) trained 4 epochs and
    extended by 4 have the losses and rates of the same trials trained 8 in the first
    place: the schedules go on where they were, across the extension."""
    variants = ("[{schedule.name: step, schedule.step_size: 3, schedule.gamma: 0.5}, "
                "{schedule.name: plateau, schedule.plateau_patience: 0, schedule.gamma: 0.7, "
                "min_delta: 1.0}]")
    eight = _sweep(tmp_path, "eight", 8, variants)
    four = _sweep(tmp_path, "four", 4, variants)
    ids = pd.read_parquet(four / "trials.parquet")["trial_id"].tolist()
    assert main(["extend", str(four), "--epochs", "4", "--trial", *ids, "--name", "plus",
                 "--no-report", "--report-every", "0"]) == 0
    capsys.readouterr()

    def curves(run: Path) -> dict[str, pd.DataFrame]:
        trials = pd.read_parquet(run / "trials.parquet").set_index("trial_id")
        epochs = pd.read_parquet(run / "epochs.parquet")
        return {trials.loc[t, "schedule.name"]: e.sort_values("epoch").reset_index(drop=True)
                for t, e in epochs.groupby("trial_id")}

    got, want = curves(tmp_path / "plus"), curves(eight)
    assert set(got) == set(want) == {"step", "plateau"}
    for name in ("step", "plateau"):
        assert list(got[name]["epoch"]) == list(range(1, 9)), name
        for col in ("train_loss", "val_loss", "lr"):
            assert got[name][col].tolist() == want[name][col].tolist(), (name, col)
    assert want["step"]["lr"].tolist() == pytest.approx([0.003] * 3 + [0.0015] * 3 +
                                                        [0.00075] * 2)
    assert want["plateau"]["lr"].iloc[4] == pytest.approx(0.003 * 0.7 ** 3)


@pytest.mark.slow
def test_compare_page_of_two_runs_renders_with_both_runs_data(small_run, tmp_path):
    """Two small real runs on different tasks: the page compares them by the ratio to each
    one's PCA, says so, every figure holds both runs, and Chromium draws it without
    errors."""
    from test_report_browser import CHROMIUM, page_errors, render

    one, two = small_run("reconstruct"), small_run("denoise")
    out = tmp_path / "compare.html"
    assert main(["compare", str(one), str(two), "-o", str(out)]) == 0
    page = out.read_text()
    assert "compared by the ratio to each run's own PCA" in page
    figures = plotly_data(page)
    assert len(figures) == 2  # 8 trials each: too few for importance, a note instead
    assert "too few trials" in page
    for traces in figures:
        names = " ".join(t.get("name") or "" for t in traces)
        assert one.name in names and two.name in names, names
    ratios = [y for t in figures[0] for y in t["y"] if y is not None]
    assert ratios and all(0 < y < 20 for y in ratios)
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    probe, log = render(out, tmp_path / "profile")
    assert probe["errors"] == [] and page_errors(log) == []
    assert len(probe["plots"]) == 2
    for p in probe["plots"]:
        assert p["width"] > 300 and p["height"] > 150 and p["scatter"] >= 2, p

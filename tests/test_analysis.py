"""The analysis package: figures, pictures, table and report.

Fast tests use synthetic frames (shaped like ``cae.results.tables``'s) and a hand-made run
directory with a freshly built model; the slow ones run a real small sweep with Ray Tune
(quickstart, 3 epochs) and check every figure on its results.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cae.report import axes, figures
from cae.report.page import build_report, write_report
from cae.report.pictures import sample_pictures, trial_samples
from cae.report.run import (
    Run,
    axis_labels,
    best_trials,
    family_colors,
    load_run,
    short_id,
    swept_axes,
)
from cae.report.synthetic import DISTORTION_FACTORS, synthetic_run
from cae.report.table import table_frame, table_html

REPO = Path(__file__).resolve().parents[1]
DISTORTIONS = list(DISTORTION_FACTORS)


# ---- a real small sweep, shared by the slow tests of this session ----------------------


@pytest.fixture(scope="session")
def recon_run(small_run) -> Path:
    return small_run("reconstruct")


@pytest.fixture(scope="session")
def denoise_run(small_run) -> Path:
    return small_run("denoise")


# ---- helpers ----------------------------------------------------------------------------


def traces(fig, name_part: str = "", kind: str | None = None) -> list:
    return [t for t in fig.data if name_part in (t.name or "") and (kind is None or t.type == kind)]


def finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


@pytest.fixture(scope="module")
def small() -> Run:
    return synthetic_run(n_trials=12, n_epochs=6, task="reconstruct", seed=1)


@pytest.fixture(scope="module")
def large() -> Run:
    return synthetic_run(n_trials=300, n_epochs=20, task="denoise", seed=2)


# ---- run helpers ----------------------------------------------------------------------


def test_swept_axes_are_the_spec_axes_that_vary(large):
    assert swept_axes(large.spec, large.trials) == [
        "model.latent_dim", "model.channels", "model.convs", "lr", "batch_size", "variant"]
    spec = {"space": {"lr": 0.01, "model.convs": {"grid": [1, 2]}}}
    assert swept_axes(spec) == ["model.convs"]


def test_variant_axis_labels_from_flattened_columns(large):
    labels = set(axis_labels(large.trials, "variant"))
    assert labels == {"base", "model.batchnorm=True", "model.dropout=0.2"}
    assert set(axis_labels(large.trials, "model.channels")) == {
        "[8, 16]", "[16, 32]", "[32, 64]", "[32, 16]"}


# ---- loss evolution -------------------------------------------------------------------


def test_loss_evolution_small_sweep_one_legend_entry_per_trial(small):
    fig = figures.loss_evolution(small.trials, small.epochs, n_best=3)
    n = len(small.trials)
    best = traces(fig, "#")
    assert len(best) == 2 * 3  # val and train panel for each of the 3 best
    assert [t.name for t in best[::2]][0].startswith("#1 trial")
    grey = [t for t in fig.data if (t.name or "").startswith("trial ")]
    assert len(grey) == 2 * (n - 3)
    assert sum(bool(t.showlegend) for t in grey) == n - 3  # one legend entry per trial
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert fig.layout.xaxis.title.text == "epoch"
    # the best trial's curve is its real epochs
    top = best_trials(small.trials, 1).iloc[0]
    curve = small.epochs[small.epochs.trial_id == top.trial_id].sort_values("epoch")
    np.testing.assert_allclose(best[0].y, curve.val_loss, rtol=1e-6)


def test_loss_evolution_merges_many_trials_into_few_traces(large):
    fig = figures.loss_evolution(large.trials, large.epochs, n_best=5)
    assert len(fig.data) <= 2 + 2 * 5 + 4  # grey val + grey train, the best, stop markers
    (grey_val, grey_train) = traces(fig, "other trials")
    assert grey_val.name == f"other trials ({len(large.trials) - 5})"
    # one NaN gap between consecutive trials
    assert np.isnan(np.asarray(grey_val.y, float)).sum() == len(large.trials) - 5 - 1
    assert len(grey_val.x) == len(grey_train.x)
    assert len(grey_val.text) == len(grey_val.x)  # hover names the trial
    markers = {t.name.split(" (")[0]: t for t in fig.data if t.mode == "markers"}
    assert {"stopped by patience", "error", "still running"} <= set(markers)
    n_err = int((large.trials.status == "ERROR").sum())
    assert len(markers["error"].x) == n_err


def test_loss_evolution_without_epochs_says_so():
    empty = pd.DataFrame(columns=["trial_id", "epoch", "train_loss", "val_loss"])
    fig = figures.loss_evolution(pd.DataFrame(columns=["trial_id", "best_val_loss"]), empty)
    assert "no epochs" in fig.layout.annotations[0].text


# ---- latent size versus error ----------------------------------------------------------


def latent_points(fig) -> list:
    """The traces of latent_vs_error that hold trials (not legend entries, not the front)."""
    return [t for t in fig.data if t.name != "Pareto front" and t.hoverinfo != "skip"
            and not str(t.name).startswith(("PCA", "distorted input"))
            and not str(t.name).endswith("mean of repeats")]


def check_latent_figure(fig, trials: pd.DataFrame, metric: str = "best_val_loss") -> None:
    assert fig.layout.xaxis.type == "log"
    assert fig.layout.xaxis.dtick == pytest.approx(math.log10(2))  # ticks at powers of 2
    assert fig.layout.yaxis.type == "log"
    colors = family_colors(trials)
    points = latent_points(fig)
    assert {t.name for t in points} == set(trials.dropna(subset=[metric])["family"])
    legend = {t.name for t in fig.data if t.showlegend is not False}
    assert {t.name for t in points} <= legend  # one legend entry per family
    for t in points:
        assert t.marker.color == colors[t.name]
        assert all("latent size" not in s for s in t.text)  # config text, latent in customdata
    assert sum(len(t.x) for t in points) == trials[metric].notna().sum()
    # trials the scheduler stopped early are the open markers, and the legend says so
    early = int((trials[metric].notna() & trials["stop_reason"].isin(["asha", "sha"])).sum())
    n_open = sum(int((np.asarray(t.marker.symbol) == "circle-open").sum()) for t in points)
    assert n_open == early
    assert any(str(name).startswith(f"open: stopped early ({early})")
               for name in legend) == (early > 0)
    (front,) = traces(fig, "Pareto front")
    x, y = np.asarray(front.x, float), np.asarray(front.y, float)
    assert np.all(np.diff(x) > 0) and np.all(np.diff(y) < 0)  # non-increasing error
    # brute force: a trial trained to the end is on the front iff no such trial with a
    # latent as small or smaller has a lower error; early-stopped trials are off the front
    ok = trials.dropna(subset=[metric])
    ok = ok[ok["stop_reason"].isin(["max_epochs", "patience"])
            & ~ok["status"].isin(["RUNNING", "PENDING", "PAUSED"])]
    expected = sorted(
        (r.latent_size, r[metric]) for _, r in ok.iterrows()
        if not ((ok.latent_size <= r.latent_size) & (ok[metric] < r[metric])).any())
    np.testing.assert_allclose(sorted(zip(x, y)), expected, rtol=1e-6)


def test_latent_vs_error_log2_axis_family_colours_and_pareto(large):
    fig = figures.latent_vs_error(large.trials, large.spec)
    check_latent_figure(fig, large.trials)
    assert "model.latent_dim = " in latent_points(fig)[0].text[0]  # hover shows the config


def test_latent_vs_error_can_use_test_loss(large):
    fig = figures.latent_vs_error(large.trials, large.spec, metric="test_loss")
    check_latent_figure(fig, large.trials, "test_loss")
    assert fig.layout.yaxis.title.text.startswith("test loss")


# ---- parallel coordinates and axis effects ----------------------------------------------


def test_parallel_coordinates_one_dimension_per_axis_coloured_by_val_loss(large):
    fig = axes.parallel_coordinates(large.trials, large.spec)
    (pc,) = fig.data
    assert pc.type == "parcoords"
    labels = [d.label for d in pc.dimensions]
    swept = swept_axes(large.spec, large.trials)
    assert labels[: len(swept)] == [a if a != "lr" else "lr (log)" for a in swept]
    assert labels[-1] == "best validation loss (log)"
    assert "latent size (log2)" not in labels  # the dense latent_dim axis already is it
    conv = large.trials.assign(latent_size=large.trials["model.latent_dim"] * 49)
    labels = [d.label for d in axes.parallel_coordinates(conv, large.spec).data[0].dimensions]
    assert labels[-2:] == ["latent size (log2)", "best validation loss (log)"]
    loss_dim = pc.dimensions[-1]
    ticks = [10 ** v for v in loss_dim.tickvals]
    lo, hi = large.trials.best_val_loss.min(), large.trials.best_val_loss.max()
    assert len(ticks) >= 3 and all(lo <= t <= hi for t in ticks)
    np.testing.assert_allclose(pc.line.color, large.trials.best_val_loss, rtol=1e-6)
    channels = pc.dimensions[swept.index("model.channels")]
    assert list(channels.ticktext) == ["[8, 16]", "[16, 32]", "[32, 16]", "[32, 64]"]


def test_axis_importance_best_error_per_axis_value(large):
    fig = axes.axis_importance(large.trials, large.spec)
    best = traces(fig, "best")
    assert len(best) == len(swept_axes(large.spec, large.trials))
    yaxes = [a for a in fig.select_yaxes()]
    assert len(yaxes) >= len(best) and all(a.type == "log" for a in yaxes)
    titles = [a.text.split("<br>")[0] for a in fig.layout.annotations]
    latent = best[titles.index("model.latent_dim")]
    want = large.trials.groupby("model.latent_dim")["best_val_loss"].min()
    assert list(latent.x) == [str(v) for v in want.index]
    np.testing.assert_allclose(latent.y, want.to_numpy(), rtol=1e-9)
    lr = best[titles.index("lr")]
    assert 2 <= len(lr.x) <= 5  # a continuous axis is binned
    # panels are ordered by spread, largest first
    spreads = [float(re.search(r"spread of best (\d+)%", a.text).group(1))
               for a in fig.layout.annotations]
    assert spreads == sorted(spreads, reverse=True)


# ---- per distortion -------------------------------------------------------------------


def test_distortion_errors_one_bar_group_per_distortion(large):
    fig = figures.distortion_errors(large.trials, large.epochs, n_best=4)
    assert len(fig.data) == 4 and all(t.type == "bar" for t in fig.data)
    assert all(list(t.x) == DISTORTIONS for t in fig.data)
    assert fig.layout.barmode == "group"
    top = best_trials(large.trials.dropna(subset=["test_loss_flip"]), 1).iloc[0]
    np.testing.assert_allclose(fig.data[0].y, [top[f"test_loss_{d}"] for d in DISTORTIONS],
                               rtol=1e-6)
    assert fig.data[0].text[DISTORTIONS.index("rotate")].endswith("x")


def test_distortion_errors_beside_the_distorted_inputs_own_error(large):
    # Study B's point: a model can beat doing nothing on average and lose to it on one
    # distortion; the bars are labelled against the distorted input's error
    identity = {d: 0.01 * (i + 1) for i, d in enumerate(DISTORTIONS)}
    base = pd.DataFrame([{"baseline": "identity", "split": split, "latent_size": math.nan,
                          "loss": 0.03, **{f"loss_{d}": v for d, v in identity.items()}}
                         for split in ("val", "test")])
    fig = figures.distortion_errors(large.trials, large.epochs, n_best=2, baselines=base)
    bars = [t for t in fig.data if t.type == "bar"]
    (ref,) = [t for t in fig.data if t.name == "returning the distorted input"]
    np.testing.assert_allclose(ref.y, [identity[d] for d in DISTORTIONS], rtol=1e-6)
    top = best_trials(large.trials.dropna(subset=["test_loss_flip"]), 1).iloc[0]
    want = [f"{top[f'test_loss_{d}'] / identity[d]:.1f}x" for d in DISTORTIONS]
    assert list(bars[0].text) == want
    assert "distorted input's own error" in fig.layout.title.text


def test_distortion_errors_fall_back_to_validation_at_best_epoch(large):
    trials = large.trials.drop(columns=[f"test_loss_{d}" for d in DISTORTIONS])
    fig = figures.distortion_errors(trials, large.epochs, n_best=3)
    assert "validation" in fig.layout.title.text
    top = best_trials(trials, 1).iloc[0]
    at = large.epochs[(large.epochs.trial_id == top.trial_id)
                      & (large.epochs.epoch == top.best_epoch)].iloc[0]
    np.testing.assert_allclose(fig.data[0].y, [at[f"val_loss_{d}"] for d in DISTORTIONS],
                               rtol=1e-6)


def test_distortion_errors_none_for_other_tasks(small):
    assert figures.distortion_errors(small.trials, small.epochs) is None


# ---- table ----------------------------------------------------------------------------


def test_table_lists_every_trial_best_first_and_sorts(large):
    df = table_frame(large.trials, large.spec)
    assert len(df) == len(large.trials)
    assert df.best_val_loss.is_monotonic_increasing
    for col in ["trial", *swept_axes(large.spec), "family", "params", "latent_size",
                "best_val_loss", "test_loss", "test_loss_flip", "epochs", "status",
                "stop_reason"]:
        assert col in df.columns
    html = table_html(large.trials, large.spec)
    assert html.count("<tr>") == len(large.trials) + 1
    assert '<th class="num"' in html and '<th class="txt"' in html


# ---- pictures, on a hand-made run directory (no Ray) ------------------------------------


def fake_run(tmp_path: Path, trial: dict, n_trials: int = 2) -> tuple[Path, pd.DataFrame]:
    """A run dir with untrained models saved as Ray checkpoints of our trainable."""
    import torch

    from cae.config.points import trial_config
    from cae.model.network import build_model

    run_dir = tmp_path / "fake"
    (run_dir).mkdir()
    (run_dir / "spec.yaml").write_text(yaml.safe_dump({"name": "fake", "trial": trial,
                                                       "space": {}}))
    rows = []
    for i in range(n_trials):
        d = run_dir / f"trial_{i}"
        (d / "checkpoint_000001").mkdir(parents=True)
        (d / "params.json").write_text(json.dumps({}))
        cfg = trial_config(trial, {})
        model = build_model(cfg.model, seed=i)
        torch.save({"model": model.state_dict(), "best_model": None, "epoch": 1},
                   d / "checkpoint_000001" / "state.pt")
        (d / "checkpoint_000001" / "history.json").write_text(json.dumps(
            {"epochs": [{"epoch": 1, "val_loss": 0.1 + i}], "static": {}, "final": None}))
        rows.append({"trial_id": f"abc_{i:05d}", "trial_dir": d.name, "best_val_loss": 0.1 + i,
                     "task.name": cfg.task.name})
    return run_dir, pd.DataFrame(rows)


def test_pictures_best_median_worst_of_each_trial(tmp_path):
    trial = {"data": {"dataset": "sample", "test_limit": 300}, "task": {"name": "denoise"},
             "model": {"preset": "dense_tiny"}}
    run_dir, trials = fake_run(tmp_path, trial)
    s = trial_samples(run_dir, trials.iloc[0], yaml.safe_load((run_dir / "spec.yaml").read_text()))
    assert s.picks == ["best", "median", "worst"]
    assert s.error[0] <= s.error[1] <= s.error[2]
    assert all(g in DISTORTIONS for g in s.group)
    assert all(img.shape == (28, 28, 3) and img.dtype == np.uint8
               for img in s.inputs + s.outputs + s.targets)
    fig = sample_pictures(run_dir, trials, {"trial": trial}, n_trials=2)
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == 2 * 3 * 3  # 2 trials x (best, median, worst) x (in, out, target)
    assert all(t.source.startswith("data:image/png;base64,") for t in images)
    assert [a.text for a in fig.layout.annotations][:3] == [
        "distorted input", "output", "clean target"]


def test_pictures_colorize_show_gray_input_and_rgb(tmp_path, monkeypatch):
    import torch

    import cae.data.datasets

    gen = torch.Generator().manual_seed(0)
    fake = cae.data.datasets.ImageData(
        name="cifar10", train=torch.randint(0, 256, (50, 3, 32, 32), generator=gen,
                                            dtype=torch.uint8),
        test=torch.randint(0, 256, (40, 3, 32, 32), generator=gen, dtype=torch.uint8))
    monkeypatch.setattr(cae.data.datasets, "load", lambda cfg: fake)  # no CIFAR-10 download
    trial = {"data": {"dataset": "cifar10"}, "task": {"name": "colorize"},
             "model": {"preset": "study_a_colorize"}}
    run_dir, trials = fake_run(tmp_path, trial, n_trials=1)
    s = trial_samples(run_dir, trials.iloc[0], {"trial": trial})
    gray = s.inputs[0].astype(int)
    assert gray.shape == (32, 32, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    truth = s.targets[0].astype(int)
    i = s.index[0]
    original = fake.test[i].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(truth - original).max() <= 2  # Y + true CbCr back to RGB is the image
    fig = sample_pictures(run_dir, trials, {"trial": trial}, n_trials=1)
    assert [a.text for a in fig.layout.annotations][:3] == [
        "gray input", "prediction (RGB)", "truth (RGB)"]


def test_pictures_without_checkpoints_explain_why(tmp_path):
    trial = {"data": {"dataset": "sample"}, "model": {"preset": "dense_tiny"}}
    run_dir, trials = fake_run(tmp_path, trial, n_trials=1)
    shutil.rmtree(run_dir / "trial_0" / "checkpoint_000001")
    fig = sample_pictures(run_dir, trials, {"trial": trial})
    assert "no checkpoint" in fig.layout.annotations[0].text


# ---- report ---------------------------------------------------------------------------


def test_report_embeds_plotlyjs_once_and_needs_no_network(large):
    from plotly.offline import get_plotlyjs

    page = build_report(large, pictures=False)
    js = get_plotlyjs()
    assert page.count(js) == 1
    rest = page.replace(js, "")
    assert "<script src" not in rest and "cdn.plot.ly" not in rest and "http" not in rest
    n_figs = page.count('class="plotly-graph-div"')
    assert n_figs == 5  # loss, latent, axes, parallel, distortions
    assert rest.count("Plotly.newPlot") == n_figs  # (the library itself may name it)
    assert 'id="trials"' in page
    for text in ("Sweep synthetic", "trial-epochs", "compute time", "Best config",
                 "have not finished"):
        assert text in page


def test_report_of_a_run_that_has_not_reported_yet(tmp_path):
    run_dir = tmp_path / "new"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text((REPO / "sweeps" / "quickstart.yaml").read_text())
    page = write_report(run_dir).read_text()
    assert "No trial has reported a validation loss yet" in page
    assert "no epochs reported yet" in page and "0 of 0 trials" in page


def test_report_of_1000_trials_x_50_epochs_stays_under_15_mb():
    run = synthetic_run(n_trials=1000, n_epochs=50, stop_early=False)
    assert len(run.epochs) == 50_000
    size = len(build_report(run, pictures=False).encode())
    assert size < 15e6, f"{size / 1e6:.1f} MB"


# ---- on a real sweep ------------------------------------------------------------------


@pytest.mark.slow
def test_real_run_figures(recon_run):
    run = load_run(recon_run)
    t, e = run.trials, run.epochs
    assert len(t) == 8 and (t.status == "TERMINATED").all()
    assert swept_axes(run.spec, t) == ["model.latent_dim", "model.channels", "model.convs"]
    fig = figures.loss_evolution(t, e, n_best=3)
    assert len(traces(fig, "#")) == 6 and len(traces(fig, "trial ")) >= 6 + 2 * 5
    # synchronous halving per latent size (4 trials each, rung at epoch 1): 2 of each
    # stratum stopped after epoch 1, shorter than the others, and marked
    stopped = t[t.stop_reason == "sha"]
    assert len(stopped) == 4 and (stopped.epochs == 1).all()
    assert sorted(stopped["model.latent_dim"]) == [4, 4, 16, 16]
    (stop,) = traces(fig, "stopped early by the scheduler")
    assert len(stop.x) == len(stopped) and max(stop.x) == 1
    assert max(len(tr.x) for tr in traces(fig, "#")) == 3
    check_latent_figure(figures.latent_vs_error(t, run.spec), t)
    pc = axes.parallel_coordinates(t, run.spec).data[0]
    assert [d.label for d in pc.dimensions][:3] == run.axes
    importance = axes.axis_importance(t, run.spec)
    assert len(traces(importance, "best")) == 3
    assert figures.distortion_errors(t, e) is None
    fig = sample_pictures(recon_run, t, run.spec)
    assert len([tr for tr in fig.data if tr.type == "image"]) == 27


@pytest.mark.slow
def test_real_denoise_run_error_per_distortion(denoise_run):
    run = load_run(denoise_run)
    fig = figures.distortion_errors(run.trials, run.epochs, n_best=3)
    assert 1 <= len(fig.data) <= 3
    assert all(list(tr.x) == DISTORTIONS for tr in fig.data)  # one group per distortion
    assert all(np.isfinite(np.asarray(tr.y, float)).all() for tr in fig.data)
    pics = sample_pictures(denoise_run, run.trials, run.spec, n_trials=1)
    assert any(g in a.text for a in pics.layout.annotations for g in DISTORTIONS)


@pytest.mark.slow
def test_write_report_on_real_run(recon_run, tmp_path):
    out = write_report(recon_run, tmp_path / "r.html")
    page = out.read_text()
    assert page.count('class="plotly-graph-div"') == 5  # loss, latent, axes, parallel, pictures
    assert "Sweep quickstart" in page and "8 terminated" in page
    assert page.count("<tr>") >= 8 + 1
    default = write_report(recon_run)
    assert default == recon_run / "report.html" and default.is_file()


@pytest.mark.slow
def test_report_on_a_run_still_going(recon_run, tmp_path):
    """No experiment state yet, a result line half written, checkpoints missing."""
    run_dir = tmp_path / "going"
    shutil.copytree(recon_run, run_dir)
    for p in run_dir.glob("experiment_state-*.json"):
        p.unlink()
    shutil.rmtree(run_dir / ".cae-state", ignore_errors=True)  # nor cae's copy of it
    trial_dirs = sorted(p for p in run_dir.iterdir() if (p / "params.json").is_file())
    for d in trial_dirs[:4]:
        for ckpt in d.glob("checkpoint_*"):
            shutil.rmtree(ckpt)
    with open(trial_dirs[0] / "result.json", "a") as f:
        f.write('{"epoch": 4, "train_loss": 0.1')
    page = write_report(run_dir).read_text()
    assert "have not finished" in page
    assert page.count('class="plotly-graph-div"') == 5


@pytest.mark.slow
def test_finished_sweep_prints_the_report_path(recon_run, capsys):
    from cae.cli import main

    assert main(["resume", str(recon_run)]) == 0  # finished: only the end of the run again
    out = capsys.readouterr().out
    assert f"report: {recon_run / 'report.html'}" in out


# ---- references, repeats, the best per latent size ----------------------------------------


def test_latent_figure_draws_pca_and_identity_baselines_on_the_metrics_split(large):
    rows = []
    for split, scale in (("val", 1.0), ("test", 1.1)):
        for k in (3, 4, 8, 16, 32, 64, 128, 1024):
            rows.append({"dataset": "kmnist", "task": "denoise", "loss_kind": "mse",
                         "baseline": "pca", "latent_size": float(k), "split": split,
                         "loss": scale * 0.05 / math.log2(k + 1)})
        rows.append({"dataset": "kmnist", "task": "denoise", "loss_kind": "mse",
                     "baseline": "identity", "latent_size": math.nan, "split": split,
                     "loss": scale * 0.048})
    base = pd.DataFrame(rows)
    fig = figures.latent_vs_error(large.trials, large.spec, baselines=base)
    (pca,) = traces(fig, "PCA (kmnist, val)")
    lo, hi = large.trials["latent_size"].min(), large.trials["latent_size"].max()
    assert list(pca.x) == [k for k in (3, 4, 8, 16, 32, 64, 128) if lo <= k <= hi]
    np.testing.assert_allclose(pca.y, [0.05 / math.log2(k + 1) for k in pca.x], rtol=1e-6)
    (ident,) = traces(fig, "distorted input unchanged (kmnist)")
    np.testing.assert_allclose(ident.y, [0.048, 0.048], rtol=1e-6)
    test_fig = figures.latent_vs_error(large.trials, large.spec, metric="test_loss",
                                       baselines=base)
    assert traces(test_fig, "PCA (kmnist, test)")
    check_latent_figure(fig, large.trials)


def test_repeats_are_drawn_as_mean_and_min_max_and_tabled(large):
    t = large.trials.head(6).copy()
    t["config_id"] = ["a", "a", "a", "b", "c", "c"]
    t["repeat"] = [0, 1, 2, 0, 0, 1]
    t["best_val_loss"] = [0.02, 0.03, 0.04, 0.05, 0.06, 0.08]
    t["latent_size"] = [8, 8, 8, 16, 32, 32]
    t["family"] = "f"
    t["stop_reason"] = "max_epochs"
    t["status"] = "TERMINATED"
    spread = figures.repeat_spread(t, "best_val_loss").set_index("config_id")
    assert list(spread.index) == ["a", "c"] and spread.loc["a", "n"] == 3
    assert spread.loc["a", "mean"] == pytest.approx(0.03)
    assert spread.loc["c", "max"] == pytest.approx(0.08)
    fig = figures.latent_vs_error(t, large.spec)
    (bars,) = [tr for tr in fig.data if str(tr.name).endswith("mean of repeats")]
    np.testing.assert_allclose(sorted(bars.y), [0.03, 0.07], rtol=1e-6)
    order = np.argsort(bars.y)
    np.testing.assert_allclose(np.asarray(bars.error_y.array)[order], [0.01, 0.01], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bars.error_y.arrayminus)[order], [0.01, 0.01],
                               rtol=1e-5)
    tab = table_frame(t, large.spec)
    assert tab.loc[tab["trial"] == short_id(t.iloc[0]["trial_id"]), "repeats"].item() == 3
    assert tab["mean_of_repeats"].dropna().round(4).tolist().count(0.03) == 3


def test_best_per_latent_size_table_ranks_only_trials_trained_to_the_end(large):
    from cae.report.table import best_per_latent

    t = large.trials.copy()
    fast = t["best_val_loss"].idxmin()
    t.loc[fast, "stop_reason"] = "sha"  # the lowest error, but stopped early: not a winner
    base = pd.DataFrame([{"baseline": "pca", "split": "val", "latent_size": float(k),
                          "loss": 0.03} for k in sorted(t["latent_size"].unique())])
    table = best_per_latent(t, large.spec, base).set_index("latent_size")
    assert set(table.index) == set(t["latent_size"].astype(int))
    for latent, group in t.groupby("latent_size"):
        done = group[group["stop_reason"].isin(["max_epochs", "patience"])
                     & ~group["status"].isin(["RUNNING", "PENDING", "PAUSED"])]
        row = table.loc[int(latent)]
        assert row["trained_to_end"] == f"{len(done)} of {len(group)}"
        if len(done):
            assert row["best_val_loss"] == pytest.approx(done["best_val_loss"].min())
            assert row["vs PCA"] == pytest.approx(done["best_val_loss"].min() / 0.03)
    assert short_id(t.loc[fast, "trial_id"]) not in set(table["trial"])


def test_pca_as_large_as_the_input_is_exact_and_said_so(large):
    # from 784 components on 28x28 images PCA reproduces its input: error 0, which a log
    # axis cannot draw and a ratio cannot divide by
    from cae.report.table import best_per_latent

    t = large.trials.copy()
    sizes = sorted(t["latent_size"].unique())
    exact_from = sizes[len(sizes) // 2]
    base = pd.DataFrame([{"dataset": "fashion_mnist", "task": "reconstruct",
                          "loss_kind": "mse", "baseline": "pca", "split": "val",
                          "latent_size": float(k), "loss": 0.0 if k >= exact_from else 0.03}
                         for k in sizes])
    table = best_per_latent(t, large.spec, base).set_index("latent_size")
    assert (table.loc[table.index >= exact_from, "vs PCA"].dropna() == "PCA exact").all()
    assert table.loc[table.index < exact_from, "vs PCA"].dropna().map(
        lambda v: isinstance(v, float)).all()
    fig = figures.latent_vs_error(t, large.spec, baselines=base)
    (pca,) = traces(fig, "PCA (fashion_mnist, val)")
    assert min(pca.y) > 0 and max(pca.x) < exact_from
    assert [s.x0 for s in fig.layout.shapes] == [exact_from]
    assert any(f"PCA exact from latent {exact_from:g}" in a.text for a in fig.layout.annotations)

"""Real Ray Tune sweeps on the embedded sample: ASHA, results files, divergence, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import kill_first_after

from cae.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "sweeps" / "quickstart.yaml")
SMALL = ["--set", "trial.data.train_limit=500", "--set", "trial.max_epochs=4", "--no-report"]


@pytest.fixture(scope="module")
def asha_run(tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    rc = main(["sweep", QUICK, "--storage", str(storage), "--name", "asha", *SMALL,
               "--set", "trial.patience=null", "--set", "scheduler.kind=asha",
               "--set", "scheduler.stratify=[]"])
    assert rc == 0
    return storage / "asha"


def test_asha_stops_some_trials_early(asha_run):
    trials = pd.read_parquet(asha_run / "trials.parquet")
    assert len(trials) == 16
    assert set(trials["status"]) == {"TERMINATED"}
    assert trials["epochs"].max() == 4
    assert trials["epochs"].min() < 4  # stopped at a rung
    stopped = trials[trials["stop_reason"] == "asha"]
    assert len(stopped) >= 8 and (stopped["epochs"] < 4).all()
    finished = trials[trials["stop_reason"] == "max_epochs"]
    assert len(finished) >= 1 and (finished["epochs"] == 4).all()
    assert finished["test_loss"].notna().all() and stopped["test_loss"].isna().all()


def test_trials_parquet_contents(asha_run):
    trials = pd.read_parquet(asha_run / "trials.parquet")
    for col in ("trial_id", "model.latent_dim", "model.channels", "model.convs", "params",
                "latent_size", "family", "best_val_loss", "last_val_loss", "test_loss",
                "epochs", "status", "stop_reason", "wall_time_s", "node_id"):
        assert col in trials, col
    assert sorted(trials["model.latent_dim"].unique()) == [4, 8, 16, 32]
    assert (trials["latent_size"] == trials["model.latent_dim"]).all()
    assert (trials["best_val_loss"] <= trials["last_val_loss"] + 1e-12).all()
    assert trials["params"].nunique() == 16 and (trials["params"] > 1000).all()
    assert (trials["wall_time_s"] > 0).all()
    spec = yaml.safe_load((asha_run / "spec.yaml").read_text())
    assert spec["trial"]["data"]["train_limit"] == 500


def test_epochs_parquet_contents(asha_run):
    trials = pd.read_parquet(asha_run / "trials.parquet")
    epochs = pd.read_parquet(asha_run / "epochs.parquet")
    assert {"trial_id", "epoch", "train_loss", "val_loss", "epoch_time_s"} <= set(epochs)
    assert len(epochs) == trials["epochs"].sum()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    per_trial = epochs.groupby("trial_id")["epoch"].max()
    assert (per_trial.sort_index() == trials.set_index("trial_id")["epochs"].sort_index()).all()
    best = trials.set_index("trial_id")["best_val_loss"]
    assert (epochs.groupby("trial_id")["val_loss"].min().sort_index()
            == best.sort_index()).all()
    # training helps: for the trials that ran to the end, val loss fell from epoch 1
    full = trials.loc[trials["epochs"] == 4, "trial_id"]
    e = epochs[epochs["trial_id"].isin(full)].pivot(index="trial_id", columns="epoch",
                                                     values="val_loss")
    assert (e[4] < e[1]).all()


def test_epochs_lost_from_result_json_come_back_from_the_checkpoints(asha_run, tmp_path):
    # Ray Tune writes result.json on the driver and copies it into the run directory in the
    # background: after a driver crash it can lack the newest epochs, which the trial's own
    # checkpoints have. Keep only the first row of every trial's result.json.
    import shutil

    from cae.results.tables import load_frames

    want_trials, want_epochs = load_frames(asha_run)
    cut = tmp_path / "cut"
    shutil.copytree(asha_run, cut)
    for result in cut.glob("*/result.json"):
        result.write_text(result.read_text().splitlines()[0] + "\n")
    trials, epochs = load_frames(cut)
    cols = ["trial_id", "best_val_loss", "best_epoch", "epochs", "stop_reason", "test_loss",
            "params", "latent_size"]
    key = ["trial_id"]
    pd.testing.assert_frame_equal(trials[cols].sort_values(key).reset_index(drop=True),
                                  want_trials[cols].sort_values(key).reset_index(drop=True))
    e_cols = ["trial_id", "epoch", "train_loss", "val_loss", "epoch_time_s"]
    key = ["trial_id", "epoch"]
    pd.testing.assert_frame_equal(epochs[e_cols].sort_values(key).reset_index(drop=True),
                                  want_epochs[e_cols].sort_values(key).reset_index(drop=True))
    assert (trials["epochs"] > 1).any()  # something was lost and came back


def test_denoise_sweep_reports_per_distortion_and_a_diverging_trial_errors(tmp_path, capsys):
    spec = {
        "name": "diverge",
        "trial": {"data": {"dataset": "sample", "train_limit": 300}, "task": {"name": "denoise"},
                  "model": {"channels": [4, 8], "latent_dim": 8, "output_activation": "linear"},
                  "max_epochs": 3, "patience": None},
        "space": {"lr": {"grid": [0.003, 1.0e12]}},
        "scheduler": {"kind": "fifo"},
        "max_failures": 0,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--storage", str(tmp_path), "--name", "d",
                 "--no-report"]) == 0
    trials = pd.read_parquet(tmp_path / "d" / "trials.parquet").set_index("lr")
    bad, good = trials.loc[1.0e12], trials.loc[0.003]
    assert bad["status"] == "ERROR"
    assert "loss became" in bad["stop_reason"] and ("nan" in bad["stop_reason"]
                                                    or "inf" in bad["stop_reason"])
    assert good["status"] == "TERMINATED" and good["epochs"] == 3
    for name in ("noise", "rotate", "flip", "patch", "brightness"):
        assert good[f"test_loss_{name}"] > 0
    epochs = pd.read_parquet(tmp_path / "d" / "epochs.parquet")
    assert {f"val_loss_{n}" for n in ("noise", "flip")} <= set(epochs)


def _finished_trials(run_dir: Path) -> dict[str, list[str]]:
    """trial dir -> its result lines, for trials whose last result has a stop reason."""
    out = {}
    for d in run_dir.glob("run_trial_*"):
        lines = (d / "result.json").read_text().splitlines() if (d / "result.json").exists() \
            else []
        if lines and "stop_reason" in json.loads(lines[-1]):
            out[d.name] = lines
    return out


def test_killed_driver_then_resume_finishes_without_rerunning(tmp_path):
    name, run_dir = "killed", tmp_path / "killed"
    cmd = [sys.executable, "-m", "cae.cli", "sweep", QUICK, "--storage", str(tmp_path),
           "--name", name, *SMALL, "--set", "scheduler.kind=fifo",
           "--set", "trial.max_epochs=3", "--set", "trial.patience=null",
           "--set", "trial.data.train_limit=2000"]  # long enough to be caught mid-way
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as a user's shell
    with open(tmp_path / "console.txt", "wb") as console:
        proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, env=env,
                                stdout=console, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and len(_finished_trials(run_dir)) < 3:
        time.sleep(0.5)
    time.sleep(1)  # let Ray Tune save its experiment state once more
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, as in a crash
    proc.wait()
    before = _finished_trials(run_dir)
    assert 3 <= len(before) < 16, "the sweep should have been interrupted mid-way"
    said = (tmp_path / "console.txt").read_text()
    assert f"sweep quickstart: 16 trials -> {run_dir}" in said, said
    assert "Token authentication" not in said  # cae's local Ray: no notice of Ray's

    assert main(["resume", str(run_dir), "--no-report"]) == 0
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 16
    assert set(trials["status"]) == {"TERMINATED"} and (trials["epochs"] == 3).all()
    after = _finished_trials(run_dir)
    for trial, lines in before.items():
        new = after[trial][len(lines):]
        # a finished trial is not trained again: at most its final result is repeated
        assert all(json.loads(n)["epoch"] == json.loads(lines[-1])["epoch"] for n in new)
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(epochs) == 16 * 3


def test_local_ray_listens_on_loopback_only():
    import psutil
    import ray

    from cae.sweep.tuner import init_ray

    init_ray(None)
    try:
        ray.get(ray.remote(lambda: 1).remote())
        pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
        listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == "LISTEN" and c.pid in pids]
    finally:
        ray.shutdown()
    assert listening, "no Ray server found"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening), listening


def test_a_crashed_trial_is_retried_from_its_checkpoint(tmp_path):
    """The trial's worker process is killed mid-run; FailureConfig retries it from its last
    checkpoint, so its epochs go on instead of starting again at 1."""
    import threading

    spec = {
        "name": "crash",
        "trial": {"data": {"dataset": "sample", "train_limit": 1500},
                  "model": {"channels": [4, 8], "latent_dim": 8}, "max_epochs": 6,
                  "patience": None},
        "scheduler": {"kind": "fifo"},
        "max_failures": 2,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "c"
    killed = {}

    killer = threading.Thread(target=kill_first_after,
                              args=(run_dir, "run_trial_*", killed, 2, 240))
    killer.start()
    assert main(["sweep", str(path), "--storage", str(tmp_path), "--name", "c",
                 "--no-report"]) == 0
    killer.join()
    assert killed, "the trial was never caught mid-run"
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert trials.loc[0, "status"] == "TERMINATED" and trials.loc[0, "num_failures"] == 1
    lines = [json.loads(x) for x in
             next(run_dir.glob("run_trial_*/result.json")).read_text().splitlines()]
    epochs = [r["epoch"] for r in lines]
    assert epochs[-1] == 6
    restart = [r for r in lines if r["pid"] != killed["pid"]]
    # after the crash the trial went on from its checkpoint, not from epoch 1
    assert restart and restart[0]["epoch"] > 1 and restart[0]["epoch"] >= killed["epoch"]


def test_datasets_and_variants_in_space_are_what_each_trial_ran(tmp_path, data_copy, capsys):
    """A grid over datasets trains each trial on its own (each loaded once); a key set by a
    variant is the trial's value in trials.parquet and in the closing best-trial line; the
    data root is recorded in the run, and report and resume read it (or --data-dir)."""
    spec = {
        "name": "mixed",
        "trial": {"data": {"dataset": "sample", "train_limit": 300, "test_limit": 200},
                  "model": {"channels": [8, 8], "latent_dim": 8}, "max_epochs": 1,
                  "patience": None},
        "space": {"data.dataset": {"grid": ["sample", "mnist"]},
                  "variant": {"grid": [{"model.channels": [8, 8]},
                                       {"model.channels": [32, 32], "lr": 0.002}]}},
        "scheduler": {"kind": "fifo"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--storage", str(tmp_path), "--name", "m",
                 "--data-dir", str(data_copy), "--no-report"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "m"
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    # each trial trained on the dataset its row names (mnist: 300 of 60,000 train images)
    for _, t in trials.iterrows():
        assert t["data_loaded"] == f"{t['data.dataset']}: (300, 1, 28, 28) train images"
    assert sorted(trials["data.dataset"]) == ["mnist", "mnist", "sample", "sample"]
    assert set(trials["precision"]) == {"fp32"}  # what precision "auto" ran in, on a CPU
    # the variant's keys are the trial's own columns
    assert sorted(trials["model.channels"]) == ["[32, 32]", "[32, 32]", "[8, 8]", "[8, 8]"]
    assert (trials.loc[trials["model.channels"] == "[32, 32]", "lr"] == 0.002).all()
    assert (trials.loc[trials["model.channels"] == "[8, 8]", "lr"] == 0.001).all()
    from cae.config.points import trial_config
    from cae.model.plan import param_count

    for channels in ([8, 8], [32, 32]):
        want = param_count(trial_config(spec["trial"], {"model.channels": channels}).model)
        assert set(trials.loc[trials["model.channels"] == str(channels), "params"]) == {want}
    best = trials.loc[trials["best_val_loss"].idxmin()]
    assert f"model.channels={best['model.channels']}" in out
    # where the data came from is in the run; report and resume use it
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["trial"]["data"]["data_dir"] == str(data_copy.resolve())
    assert main(["report", str(run_dir)]) == 0
    assert "Pictures" in (run_dir / "report.html").read_text()
    assert main(["report", str(run_dir), "--data-dir", str(data_copy), "-o",
                 str(tmp_path / "r.html")]) == 0
    assert main(["resume", str(run_dir), "--data-dir", str(data_copy), "--no-report"]) == 0
    # the data moved: the pictures of a recorded mnist trial read them where --data-dir says
    from cae.data.datasets import DatasetUnavailable, clear_cache
    from cae.report.pictures import trial_samples

    mnist = trials[trials["data.dataset"] == "mnist"].iloc[0]
    moved = tmp_path / "moved"
    data_copy.rename(moved)
    try:
        clear_cache()
        with pytest.raises(DatasetUnavailable, match=str(data_copy.resolve())):
            trial_samples(run_dir, mnist, saved, max_samples=50)
        shown = trial_samples(run_dir, mnist, saved, max_samples=50, data_dir=str(moved))
        assert shown.picks == ["best", "median", "worst"] and shown.mean_error > 0
        capsys.readouterr()
        assert main(["report", str(run_dir), "--data-dir", str(moved), "-o",
                     str(tmp_path / "moved.html")]) == 0
        from plotly.offline import get_plotlyjs

        page = (tmp_path / "moved.html").read_text()
        pictures = page.count("base64,") - get_plotlyjs().count("base64,")
        assert pictures == 3 * 3 * 3  # three trials, mnist among them: input, output, target

    finally:
        if moved.exists():  # looking for the data where they were left empty folders there
            shutil.rmtree(data_copy, ignore_errors=True)
            moved.rename(data_copy)
        clear_cache()
    assert len(pd.read_parquet(run_dir / "trials.parquet")) == 4


def test_random_axes_over_data_are_refused_before_ray(tmp_path, capsys):
    spec = {"name": "r", "space": {"data.val_fraction": {"uniform": [0.1, 0.2]}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--storage", str(tmp_path)]) == 2
    assert "space.data.val_fraction" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()) or list(tmp_path.iterdir()) == [path]


@pytest.fixture(scope="module")
def sha_runs(tmp_path_factory):
    """The quickstart (synchronous halving per latent size) under two trial orders."""
    storage = tmp_path_factory.mktemp("sha")
    for seed in (0, 1):
        assert main(["sweep", QUICK, "--storage", str(storage), "--name", f"s{seed}", *SMALL,
                     "--set", "trial.patience=null", "--set", f"seed={seed}"]) == 0
    return [pd.read_parquet(storage / f"s{seed}" / "trials.parquet") for seed in (0, 1)]


def test_stratified_halving_trains_each_latent_sizes_best_to_the_end(sha_runs):
    """4 trials per latent size, rungs at epochs 1 and 3 (reduction factor 3): at each size
    2 pass rung 1, 1 passes rung 3 and runs to max_epochs 4; 9 trial-epochs per size."""
    for trials in sha_runs:
        assert len(trials) == 16 and set(trials["status"]) == {"TERMINATED"}
        for latent, group in trials.groupby("model.latent_dim"):
            assert sorted(group["epochs"]) == [1, 1, 3, 4], latent
            winner = group.loc[group["best_val_loss"].idxmin()]
            assert winner["epochs"] == 4 and winner["stop_reason"] == "max_epochs"
            assert (group.loc[group["epochs"] < 4, "stop_reason"] == "sha").all()
        assert trials["epochs"].sum() == 4 * 9


def test_stratified_halving_winners_do_not_depend_on_trial_order(sha_runs):
    def outcome(trials):
        return {(int(r["model.latent_dim"]), r["model.channels"], int(r["model.convs"])):
                int(r["epochs"]) for _, r in trials.iterrows()}

    first, second = sha_runs
    # started in another order (shuffled with another seed) ...
    assert list(first["trial_dir"]) != list(second["trial_dir"])
    # ... every configuration ran the same epochs, so every latent size has the same winner
    assert outcome(first) == outcome(second)


def test_repeats_differ_by_seed_and_nothing_else(tmp_path):
    from cae.config.points import REPEAT_SEED_STRIDE

    spec = {"name": "rep", "trial": {"data": {"dataset": "sample", "train_limit": 300},
                                     "model": {"channels": [4, 8], "latent_dim": 8},
                                     "max_epochs": 2, "patience": None, "seed": 5},
            "space": {"model.latent_dim": {"grid": [4, 8]}}, "num_samples": 3,
            "scheduler": {"kind": "fifo"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--storage", str(tmp_path), "--name", "r",
                 "--no-report"]) == 0
    trials = pd.read_parquet(tmp_path / "r" / "trials.parquet")
    assert len(trials) == 6
    for _, group in trials.groupby("model.latent_dim"):
        assert sorted(group["repeat"]) == [0, 1, 2]
        assert sorted(group["seed"]) == [5 + r * REPEAT_SEED_STRIDE for r in (0, 1, 2)]
        assert group["config_id"].nunique() == 1  # one configuration, three repeats
        assert group["best_val_loss"].nunique() == 3  # ... that differ by their seed
    assert trials["config_id"].nunique() == 2

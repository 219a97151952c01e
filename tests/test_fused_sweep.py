"""Fused sweeps through ``cae sweep``: one Ray Tune trial per pack, one table row per member,
real small Ray runs on the embedded sample (the slow tier)."""

import json
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import assert_resumed_losses, epochs_trained, pack_workers, spec_with

from cae.cli import main
from cae.config.spec import SweepSpec
from cae.config.trial import TrialConfig

SPEC = {
    "name": "fused",
    "trial": {"data": {"dataset": "sample", "train_limit": 400},
              "model": {"channels": [4, 8], "bottleneck": "dense", "dense": [32],
                        "latent_dim": 8, "dropout": 0.1},
              "batch_size": 64, "max_epochs": 2, "patience": None, "device": "cpu"},
    "space": {"lr": {"grid": [0.002, 0.01]}, "model.latent_dim": {"grid": [4, 8]}},
    "num_samples": 2,
    "scheduler": {"kind": "fifo"},
    "fuse": {"max_members": 4},
    "max_failures": 0,
}


def _write(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_with(SPEC, **changes)))
    return path


def test_dry_run_lists_the_packs_and_their_memory(tmp_path, capsys):
    assert main(["sweep", str(_write(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fused packs: 2 (up to 4 members each) for 8 trials" in out
    rows = [ln for ln in out.splitlines() if ln.strip().startswith("4 ") and "MiB" in ln]
    assert len(rows) == 2 and {"model.latent_dim=4" in r for r in rows} == {True, False}


def test_fusion_with_optuna_is_refused_in_one_line_saying_why(tmp_path, capsys):
    change = {"search.kind": "optuna", "space.lr": {"uniform": [0.001, 0.01]}}
    assert main(["sweep", str(_write(tmp_path, **change)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fuse: packs are formed from trials known before they start" in err
    assert "search.kind 'optuna' proposes each trial from the results" in err


def test_fuse_auto_fuses_gpu_trials_only():
    base = {"fuse": "auto", "scheduler": {"kind": "fifo"}}
    assert SweepSpec.model_validate(base).fusion() is None  # CPU trials: each on its own
    assert SweepSpec.model_validate({**base, "resources": {"gpu": 0.25}}).fusion() == 32
    assert SweepSpec.model_validate({**base, "trial": {"device": "cuda"}}).fusion() == 32
    # auto on a CPU sweep leaves the scheduler free
    assert SweepSpec.model_validate({"fuse": "auto", "scheduler": {"kind": "sha"}}).fuse.auto
    assert SweepSpec.model_validate({"fuse": {"max_members": 8},
                                     "scheduler": {"kind": "fifo"}}).fusion() == 8


def _tables(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_parquet(run_dir / "trials.parquet"),
            pd.read_parquet(run_dir / "epochs.parquet"))


@pytest.mark.slow
def test_a_fused_sweep_has_a_row_per_member_like_an_unfused_one(tmp_path):
    spec = _write(tmp_path)
    assert main(["sweep", str(spec), "--storage", str(tmp_path), "--name", "f",
                 "--no-report"]) == 0
    assert main(["sweep", str(spec), "--storage", str(tmp_path), "--name", "u",
                 "--no-report", "--set", "fuse=null"]) == 0
    fused, fused_epochs = _tables(tmp_path / "f")
    alone, alone_epochs = _tables(tmp_path / "u")
    assert len(fused) == len(alone) == 8 and len(fused_epochs) == len(alone_epochs) == 16
    assert list(fused.columns) == list(alone.columns)
    assert list(fused_epochs.columns) == list(alone_epochs.columns)
    key = ["lr", "model.latent_dim", "seed"]
    fused, alone = fused.sort_values(key).reset_index(drop=True), \
        alone.sort_values(key).reset_index(drop=True)
    config = [c for c in alone.columns if c.startswith(("model.", "data.", "task.", "lr",
                                                        "seed", "max_epochs", "config_id"))]
    pd.testing.assert_frame_equal(fused[config], alone[config])
    assert set(fused["status"]) == {"TERMINATED"} and set(fused["stop_reason"]) == {"max_epochs"}
    assert fused["test_loss"].notna().all() and fused["trial_id"].is_unique
    assert fused["trial_dir"].str.contains("/member_").all()
    assert fused_epochs.groupby("trial_id")["epoch"].apply(list).map(lambda e: e == [1, 2]).all()
    # fusing is a speed setting: every member computes what its unfused twin computes
    # (its own batches, its own dropout masks), every epoch, within float rounding
    twin = {tuple(r[key]): r["trial_id"] for _, r in alone.iterrows()}
    compared = 0
    for _, row in fused.iterrows():
        mine = fused_epochs[fused_epochs["trial_id"] == row["trial_id"]].sort_values("epoch")
        theirs = alone_epochs[alone_epochs["trial_id"] == twin[tuple(row[key])]].sort_values(
            "epoch")
        for column in ("train_loss", "val_loss"):
            assert mine[column].tolist() == pytest.approx(theirs[column].tolist(), rel=1e-4)
        compared += 1
    assert compared == 8
    # the report's pictures rebuild a member from its own checkpoint
    from cae.report.pictures import trial_samples

    samples = trial_samples(tmp_path / "f", fused.iloc[0], yaml.safe_load(spec.read_text()),
                            max_samples=100)
    assert samples.trial_id == fused.iloc[0]["trial_id"] and samples.mean_error > 0


@pytest.mark.slow
def test_a_crashed_pack_goes_on_exactly_from_its_checkpoint(tmp_path):
    """The pack's worker is killed after epoch 2 of 4; Tune retries it from its members'
    checkpoints, and every member's losses equal those of the same pack trained here
    without a break."""
    # 3,000 images: epochs long enough for the killer to land mid-way (a pack reports
    # without a checkpoint of its own, so a small one runs through in a blink)
    path = _write(tmp_path, **{"trial.max_epochs": 4, "trial.data.train_limit": 3000,
                               "space": {"lr": {"grid": [0.002, 0.01]}}, "max_failures": 2})
    run_dir = tmp_path / "c"
    killed = {}

    killer = threading.Thread(target=_kill_the_first_pack_after, args=(run_dir, 2, killed))
    killer.start()
    assert main(["sweep", str(path), "--storage", str(tmp_path), "--name", "c",
                 "--no-report"]) == 0
    killer.join()
    assert killed and killed["epoch"] < 4, "the pack should have been killed mid-way"
    trials, epochs = _tables(run_dir)
    assert len(trials) == 4 and set(trials["num_failures"]) == {1}
    assert (epochs.groupby("trial_id")["epoch"].apply(list) == [[1, 2, 3, 4]] * 4).all()

    from cae.data.datasets import load
    from cae.train.pack import Pack

    pack_dir = next(run_dir.glob("run_pack_*"))
    members = sorted(pack_dir.glob("member_*"))
    cfgs = [TrialConfig.model_validate(json.loads((m / "trial.json").read_text())["config"])
            for m in members]
    torch.set_num_threads(1)  # as the trial ran (resources.cpu: 1)
    pack = Pack(cfgs, load(cfgs[0].data))
    pack.fit()
    for member, folder in zip(pack.members, members):
        rows = epochs[epochs["trial_id"] == trials.set_index("trial_dir").loc[
            f"{pack_dir.name}/{folder.name}", "trial_id"]].sort_values("epoch")
        assert rows["val_loss"].tolist() == pytest.approx(
            [h["val_loss"] for h in member.history], rel=1e-6)


def _kill_the_first_pack_after(run_dir: Path, epochs: int, killed: dict,
                               timeout: float = 300.0) -> None:
    """SIGKILL the worker of the first pack whose members have trained ``epochs`` epochs
    (``helpers.pack_workers``); ``killed`` gets its epoch and pid."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        for w in pack_workers(run_dir):
            if w["epoch"] >= epochs and not w["ended"]:
                killed.update(epoch=w["epoch"], pid=w["pid"])
                os.kill(w["pid"], signal.SIGKILL)
                return
        time.sleep(0.05)


def _member_losses(run_dir: Path, column: str = "val_loss") -> dict[tuple, list[float]]:
    """(lr, latent, seed) -> a member's validation losses (or ``column``), epoch by epoch."""
    trials, epochs = _tables(run_dir)
    out = {}
    for _, row in trials.iterrows():
        rows = epochs[epochs["trial_id"] == row["trial_id"]].sort_values("epoch")
        assert rows["epoch"].tolist() == list(range(1, len(rows) + 1)), "an epoch twice"
        out[(row["lr"], row["model.latent_dim"], row["seed"])] = rows[column].tolist()
    return out


@pytest.mark.slow
def test_pack_processes_killed_at_random_lose_nothing(tmp_path):
    """Two packs of four, 4 epochs, under a plateau schedule (the rate times 0.7 after two
    epochs in a row not better by min_delta 1: its count of such epochs is state); a
    running pack's worker is SIGKILLed after every second epoch reported (a random one of
    those running), three times; Tune retries each from its checkpoint, and every member's
    losses and rates equal an undisturbed fused run's, bit for bit."""
    import subprocess
    import sys

    from helpers import kill_packs_at_random

    path = _write(tmp_path, **{"trial.max_epochs": 4, "max_failures": 3,
                               "trial.data.train_limit": 3000, "trial.min_delta": 1.0,
                               "trial.schedule": {"name": "plateau", "plateau_patience": 1,
                                                  "gamma": 0.7}})
    assert main(["sweep", str(path), "--storage", str(tmp_path), "--name", "u",
                 "--no-report", "--report-every", "0"]) == 0
    run_dir = tmp_path / "k"
    proc = subprocess.Popen([sys.executable, "-m", "cae.cli", "sweep", str(path), "--storage",
                             str(tmp_path), "--name", "k", "--no-report", "--report-every", "0"],
                            cwd=tmp_path, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kills = kill_packs_at_random(proc, run_dir, every=2, first_at=1)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert kills >= 2, "too few kills landed"
    trials, _ = _tables(run_dir)
    assert len(trials) == 8 and set(trials["status"]) == {"TERMINATED"}
    assert trials["num_failures"].sum() >= 2
    assert _member_losses(run_dir) == _member_losses(tmp_path / "u")
    rates = _member_losses(run_dir, "lr")
    assert rates == _member_losses(tmp_path / "u", "lr")
    # better at epoch 1, not at 2 and 3: times 0.7 for epoch 4
    assert all(r[:3] == [r[0]] * 3 and r[3] == pytest.approx(0.7 * r[0])
               for r in rates.values()), rates


@pytest.mark.slow
def test_a_fused_run_interrupted_by_the_code_before_one_loop_resumes_to_its_losses(tmp_path,
                                                                                  capsys):
    """``tests/data/interrupted-fused-run`` was stopped after 2 or 3 of 4 epochs (Ctrl-C) by the
    code before packs resumed from their members' checkpoints (commit 3a44e34: its packs
    kept checkpoints of their own). It resumes from its members' checkpoints, every member
    ends with each epoch once, and the losses are those of the same spec run undisturbed by
    that code (bit for bit on the machine that made it; see ``assert_resumed_losses``)."""
    import shutil

    data = Path(__file__).parent / "data"
    run = tmp_path / "run"
    shutil.copytree(data / "interrupted-fused-run", run)
    before = pd.read_parquet(run / "trials.parquet")
    assert set(before["status"]) == {"RUNNING"} and before["epochs"].between(1, 3).all()
    assert main(["resume", str(run), "--no-report", "--report-every", "0"]) == 0
    capsys.readouterr()
    trials, epochs = _tables(run)
    epochs = epochs.drop(columns=["lr"]).merge(trials[["trial_id", "model.latent_dim", "lr"]],
                                               on="trial_id")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    got = {(int(a), float(b), int(c)): float(v) for a, b, c, v in zip(
        epochs["model.latent_dim"], epochs["lr"], epochs["epoch"], epochs["val_loss"])}
    expected = json.loads((data / "interrupted-fused-run-losses.json").read_text())
    old = pd.read_parquet(data / "interrupted-fused-run" / "epochs.parquet").drop(
        columns=["lr"])
    trained = epochs_trained(before, old, ["model.latent_dim", "lr"])
    assert_resumed_losses(got, {tuple(row[:3]): row[3] for row in expected}, trained)

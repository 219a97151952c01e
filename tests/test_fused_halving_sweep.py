"""Fused packs under successive halving through ``cae sweep`` on Ray Tune, on the embedded
sample (the slow tier): the answer of the unfused sweep, and nothing lost to killed packs
(also while a regrouped pack starts) or a killed driver."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import kill_packs_at_random, pack_workers, spec_with

from cae.cli import main

pytestmark = pytest.mark.slow
KEY = ["model.latent_dim", "lr", "repeat"]
SPEC = {
    "name": "fused-sha",
    "trial": {"data": {"dataset": "sample", "train_limit": 1000},
              "model": {"channels": [4, 8], "bottleneck": "dense", "dense": [32],
                        "latent_dim": 8},
              "batch_size": 100, "max_epochs": 10, "patience": None, "device": "cpu"},
    "space": {"lr": {"grid": [0.001, 0.003, 0.01]}, "model.latent_dim": {"grid": [4, 16]}},
    "num_samples": 3,
    "scheduler": {"kind": "sha", "stratify": ["model.latent_dim"], "grace_period": 1,
                  "reduction_factor": 3},
    "fuse": {"max_members": 3},
    "max_failures": 0,
}


def _write(folder: Path, **changes) -> Path:
    path = folder / f"spec-{len(list(folder.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(spec_with(SPEC, **changes)))
    return path


def _sweep(spec: Path, storage: Path, name: str, *more: str) -> Path:
    assert main(["sweep", str(spec), "--storage", str(storage), "--name", name, "--no-report",
                 "--report-every", "0", *more]) == 0
    return storage / name


def _tables(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet").drop(columns=["lr"]).merge(
        trials[["trial_id", *KEY]], on="trial_id")
    return trials.set_index(KEY).sort_index(), epochs


def test_a_fused_sha_sweep_gives_the_unfused_answer(tmp_path):
    """18 trials (latent 4 and 16 x 3 learning rates x 3 repeats), packs of 3, rungs at
    epochs 1, 3 and 9: the same winner at each latent size and the same trial-epochs as
    unfused, each member's first epoch within 1% of its twin's (fp32: fused and plain
    kernels round differently, and training grows the difference)."""
    spec = _write(tmp_path)
    fused, fused_epochs = _tables(_sweep(spec, tmp_path, "f"))
    alone, alone_epochs = _tables(_sweep(spec, tmp_path, "u", "--set", "fuse=null"))
    assert len(fused) == len(alone) == 18
    assert fused["epochs"].sum() == alone["epochs"].sum() == 9 * 2 + 2 * 3 * 2 + 6 * 2 + 2
    for latent in (4, 16):
        assert fused.loc[latent]["best_val_loss"].idxmin() == \
            alone.loc[latent]["best_val_loss"].idxmin()
    first = [e[e["epoch"] == 1].set_index(KEY)["val_loss"].sort_index()
             for e in (fused_epochs, alone_epochs)]
    assert ((first[0] / first[1] - 1).abs() < 0.01).all()
    # members stopped by the halving read as unfused trials stopped by it
    assert set(fused["status"]) == {"TERMINATED"}
    stopped = fused["stop_reason"] == "sha"
    assert stopped.sum() == 16 and fused.loc[stopped, "test_loss"].isna().all()
    assert fused.loc[~stopped, "stop_reason"].eq("max_epochs").all()
    # the epochs say which pack trained them: a winner trained in 4 packs (start, after
    # each of the three rungs), and every pack once per epoch
    winner = fused.loc[~stopped, "trial_id"].iloc[0]
    assert fused_epochs.loc[fused_epochs["trial_id"] == winner, "pack"].nunique() == 4
    assert alone_epochs["pack"].isna().all()
    # cae extend: two members the halving stopped at epoch 3 go on together in one pack,
    # each from its own checkpoint, to epoch 5
    two = fused[(fused["epochs"] == 3)].loc[4, "trial_id"].tolist()[:2]
    assert len(two) == 2
    assert main(["extend", str(tmp_path / "f"), "--epochs", "2", "--trial", *two, "--name",
                 "x", "--no-report", "--report-every", "0"]) == 0
    extended = pd.read_parquet(tmp_path / "x" / "trials.parquet")
    assert len(list((tmp_path / "x").glob("run_pack_*"))) == 1  # one pack of the two
    assert extended["extended_at"].tolist() == [3, 3]
    assert extended["epochs"].tolist() == [5, 5]
    assert set(extended["stop_reason"]) == {"max_epochs"} and extended["test_loss"].notna().all()
    epochs = pd.read_parquet(tmp_path / "x" / "epochs.parquet")
    for _, rows in epochs.groupby("trial_id"):
        assert rows["epoch"].tolist() == [1, 2, 3, 4, 5]
        assert rows["pack"].iloc[-1] == rows["pack"].iloc[-2] != rows["pack"].iloc[2]


def _losses(run_dir: Path) -> dict[tuple, tuple[float, float]]:
    """(latent, lr, repeat, epoch) -> (train, val) loss, each epoch once."""
    trials, epochs = _tables(run_dir)
    assert len(trials) == 12 and set(trials["status"]) == {"TERMINATED"}, trials["status"]
    keys = zip(*(epochs[k] for k in KEY), epochs["epoch"])
    out = dict(zip(keys, zip(epochs["train_loss"], epochs["val_loss"])))
    assert len(out) == len(epochs), "an epoch appears twice in epochs.parquet"
    for trial_id, rows in epochs.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(1, len(rows) + 1)), trial_id
    return out


def _start(spec: Path, storage: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cae.cli", "sweep", str(spec), "--storage",
                             str(storage), "--name", name, "--no-report", "--report-every",
                             "0"], cwd=storage, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_at_the_last_rung_arrival(proc, run_dir: Path, packs: int, killed: list) -> None:
    """SIGKILL the worker of the last of the sweep's ``packs`` first packs to reach the rung
    at epoch 1, as soon as its members' checkpoints of that epoch are written: the rung is
    decided then, its survivors regrouped into new packs, and that worker goes on to
    another pack; the kill lands in the middle of it."""
    import os
    import signal

    from helpers import pack_workers

    seen: set[str] = set()
    while proc.poll() is None:
        first = {w["dir"]: w for w in pack_workers(run_dir)
                 if not w["regrouped"] and w["epoch"] >= 1}
        if len(first) == packs:
            last = [w for name, w in first.items() if name not in seen][-1]
            os.kill(last["pid"], signal.SIGKILL)
            killed.append(last["pid"])
            return
        seen = set(first)
        time.sleep(0.02)


def test_killed_packs_and_a_killed_driver_lose_nothing(tmp_path, capsys):
    """12 trials, packs of 3, rungs at epochs 1 and 3 of 5. Pack workers SIGKILLed at
    random (Tune retries each from its members' checkpoints), one of them as the first rung
    is decided and its survivors regrouped; and, in another run, the driver SIGKILLed
    mid-sweep and the run finished by ``cae resume``. Every member ends with each epoch
    once, and its losses equal, bit for bit, those of an undisturbed fused run of the same
    spec (who shares a pack follows from the halving's decisions alone: ``work_ahead``
    off)."""
    from test_faults import _kill_driver, _resume, _wait_for

    spec = _write(tmp_path, **{"num_samples": 2, "trial.max_epochs": 5, "max_failures": 6,
                               "scheduler.work_ahead": False, "trial.data.train_limit": 2000})
    undisturbed = _losses(_sweep(spec, tmp_path, "u"))
    assert len(undisturbed) == 12 + 4 * 2 + 2 * 2

    run_dir = tmp_path / "k"
    proc = _start(spec, tmp_path, "k")
    killed: list[int] = []
    regroup = threading.Thread(target=_kill_at_the_last_rung_arrival,
                               args=(proc, run_dir, 4, killed))
    regroup.start()
    # Tune retries a worker killed while it trains: the random kills go to packs training
    # between rungs (a pack at a rung ends there, and its worker may start another)
    kills = kill_packs_at_random(proc, run_dir, every=4, first_at=14,
                                 ok=lambda w: w["epoch"] not in (1, 3))
    out, err = proc.communicate(timeout=900)
    regroup.join()
    assert proc.returncode == 0, err
    assert killed and kills >= 1, (killed, kills)
    trials, _ = _tables(run_dir)
    assert trials["num_failures"].sum() >= 1
    assert _losses(run_dir) == undisturbed

    run_dir = tmp_path / "d"
    proc = _start(spec, tmp_path, "d")
    _wait_for(lambda: any(w["regrouped"] for w in pack_workers(run_dir)),
              "a pack formed from survivors training")
    _kill_driver(proc)
    rc, said = _resume(run_dir, capsys)
    assert rc == 0, said
    assert _losses(run_dir) == undisturbed


def test_a_fused_asha_sweep_halves_members_and_regroups_survivors(tmp_path):
    """Under asha each member is a trial to Ray's ASHA: the members it stops read as unfused
    trials it stops, each trial ends once with every epoch once, and a member that goes on
    trains in packs formed after the rung (its epochs name more than one pack)."""
    spec = _write(tmp_path, **{"scheduler.kind": "asha", "num_samples": 2,
                               "trial.max_epochs": 5})
    trials, epochs = _tables(_sweep(spec, tmp_path, "a"))
    assert len(trials) == 12 and set(trials["status"]) == {"TERMINATED"}
    assert set(trials["stop_reason"]) == {"asha", "max_epochs"}
    for _, rows in epochs.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(1, len(rows) + 1))
    to_the_end = trials.loc[trials["stop_reason"] == "max_epochs", "trial_id"]
    packs = epochs[epochs["trial_id"].isin(to_the_end)].groupby("trial_id")["pack"].nunique()
    assert (packs > 1).all()

"""Helpers several test modules share: finding a test's own processes, killing trials, a
tiny trial config."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def processes_naming(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (a temp dir of the test)."""
    import psutil

    pids = []
    for proc in psutil.process_iter():
        try:
            if marker in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return pids


def kill_first_after(run_dir: Path, pattern: str, killed: dict, rows: int = 2,
                     timeout: float = 300.0) -> None:
    """SIGKILL the worker of the first trial (a ``pattern`` glob of run directories under
    ``run_dir``) whose result.json holds ``rows`` rows; ``killed`` gets its epoch and pid.
    Run it in a thread beside the sweep; it gives up after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for result in run_dir.glob(f"{pattern}/result.json"):
            lines = result.read_text().splitlines()
            if len(lines) >= rows:
                last = json.loads(lines[-1])
                killed.update(epoch=last["epoch"], pid=last["pid"])
                os.kill(last["pid"], signal.SIGKILL)
                return
        time.sleep(0.1)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now, and that this process has
    not handed out before: the OS may give a port just closed again, and a command given
    two such ports (Ray's GCS and its agent, say) would refuse to start."""
    import socket

    held = []
    try:
        while True:
            s = socket.socket()
            held.append(s)  # kept open until one is found: the OS does not give it again
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    finally:
        for s in held:
            s.close()


def epochs_reported(run_dir: Path) -> int:
    """Result lines the trials of a run directory have written (every epoch reported)."""
    return sum(len(p.read_text().splitlines()) for p in run_dir.glob("*/result.json"))


def kill_running_at_random(proc: subprocess.Popen, run_dir: Path, pattern: str, every: int,
                           first_at: int | None = None,
                           running: Callable[[dict], bool] = lambda last: True,
                           kills: int = 3, seed: int = 0) -> int:
    """While the sweep ``proc`` runs, SIGKILL the worker of one running trial (a random one
    of the ``pattern`` glob under ``run_dir`` whose last result row has no ``stop_reason``
    and passes ``running``) once ``first_at`` epochs (default ``every``) are reported, then
    after every ``every`` more, ``kills`` times. Returns how many kills landed."""
    rng, landed, next_at = random.Random(seed), 0, every if first_at is None else first_at
    while proc.poll() is None and landed < kills:
        time.sleep(0.1)
        if epochs_reported(run_dir) < next_at:
            continue
        pids = set()
        for result in run_dir.glob(f"{pattern}/result.json"):
            lines = result.read_text().splitlines()
            last = json.loads(lines[-1]) if lines else None
            if last is not None and "stop_reason" not in last and running(last):
                pids.add(last["pid"])
        for pid in rng.sample(sorted(pids), min(1, len(pids))):
            try:
                os.kill(pid, signal.SIGKILL)
                landed += 1
                next_at = epochs_reported(run_dir) + every
            except ProcessLookupError:
                pass
    return landed


def tiny_config(max_epochs: int = 3, **kw):
    """A small trial config on the embedded sample (120 training images, two convs, latent
    4, BatchNorm, no early stopping, CPU); ``model_<key>`` sets a model setting."""
    from cae.config.trial import TrialConfig

    base = {"data": {"dataset": "sample", "train_limit": 120, "test_limit": 40},
            "lr": 0.003, "batch_size": 36, "eval_batch_size": 64, "max_epochs": max_epochs,
            "patience": None, "device": "cpu",
            "model": {"channels": [2, 4], "dense": [16], "latent_dim": 4, "batchnorm": True}}
    for key, value in kw.items():
        if key.startswith("model_"):
            base["model"][key.removeprefix("model_")] = value
        else:
            base[key] = value
    return TrialConfig.model_validate(base)


def spec_with(spec: dict, **changes) -> dict:
    """A copy of the sweep spec ``spec`` with dotted ``changes`` (``trial.max_epochs=4``; a
    value of None removes the key)."""
    out = json.loads(json.dumps(spec))
    for key, value in changes.items():
        *path, last = key.split(".")
        target = out
        for part in path:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return out


def epochs_trained(trials, epochs, keys: list[str]) -> set[tuple]:
    """(keys..., epoch) of the epochs a run had trained (its tables)."""
    rows = epochs.merge(trials[["trial_id", *keys]], on="trial_id")
    return {(*map(_plain, (r[k] for k in keys)), int(r["epoch"])) for _, r in rows.iterrows()}


def _plain(value):
    return int(value) if float(value).is_integer() else float(value)


def assert_resumed_losses(got: dict, expected: dict, trained_before: set) -> None:
    """A resumed run's losses against the same spec run undisturbed, on the machine that
    recorded it: the epochs trained before the interruption equal bit for bit, those after
    within 1e-5 (bit for bit on that machine; another CPU rounds differently)."""
    import pytest

    assert set(got) == set(expected)
    for key, value in expected.items():
        if key in trained_before:
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=0), key


def pack_workers(run_dir: Path) -> list[dict]:
    """What each fused pack of a run directory is doing, from its members' newest
    checkpoints (written into the run directory as they train; Tune's own files of a pack
    get there only now and then): its directory (``dir``), the last epoch it trained, the
    worker process that trained it (``pid``), whether every member it trained has ended,
    and whether it was formed from members of earlier packs (``regrouped``)."""
    from cae.run.checkpoints import newest_history

    packs: dict[str, dict] = {}
    for folder in run_dir.glob("*/member_*"):
        history = newest_history(folder)
        epochs = history.get("epochs") or []
        if not epochs or not epochs[-1].get("pack"):
            continue
        name = epochs[-1]["pack"]
        w = packs.setdefault(name, {"dir": name, "epoch": 0, "pid": None, "ended": True,
                                    "regrouped": name != folder.parent.name})
        w["epoch"] = max(w["epoch"], int(epochs[-1]["epoch"]))
        w["pid"] = (history.get("static") or {}).get("pid")
        w["ended"] &= bool(history.get("final"))
    return list(packs.values())


def member_epochs(run_dir: Path) -> int:
    """Epochs the members of a fused run's packs have trained so far, each once."""
    from cae.run.checkpoints import newest_history

    return sum(len(newest_history(f).get("epochs") or []) for f in run_dir.glob("*/member_*"))


def kill_packs_at_random(proc: subprocess.Popen, run_dir: Path, every: int,
                         first_at: int | None = None,
                         ok: Callable[[dict], bool] = lambda worker: True,
                         kills: int = 3, seed: int = 0) -> int:
    """``kill_running_at_random`` for a fused run's packs (``pack_workers``): SIGKILL the
    worker of a random pack that has not ended and passes ``ok`` once ``first_at`` member
    epochs are trained, then after every ``every`` more, ``kills`` times. Returns how many
    kills landed."""
    rng, landed, next_at = random.Random(seed), 0, every if first_at is None else first_at
    killed: set[int] = set()
    while proc.poll() is None and landed < kills:
        time.sleep(0.1)
        if member_epochs(run_dir) < next_at:
            continue
        pids = {w["pid"] for w in pack_workers(run_dir)
                if not w["ended"] and w["pid"] not in killed and ok(w)}
        for pid in rng.sample(sorted(pids), min(1, len(pids))):
            try:
                os.kill(pid, signal.SIGKILL)
                landed += 1
                killed.add(pid)
                next_at = member_epochs(run_dir) + every
            except ProcessLookupError:
                pass
    return landed


def check_wandb_history(run_dir: Path, exact: bool = True) -> dict:
    """Every trial of a run's tables is one W&B run under ``run_dir/wandb``, read from
    W&B's own files: its history holds each epoch of ``epochs.parquet`` once, in order, with
    its train and validation loss (``exact``: as logged, else to float32 precision: an
    epoch trained again after a kill) and every other number of the epoch (its times only
    present: they differ when an epoch is trained again); its summary holds the trial's
    status and best validation loss, and its newest folder ended (exit code 1 for a trial
    that failed). Returns trial id -> what W&B holds of it."""
    import math

    import pandas as pd
    import pytest

    from cae.track.wandbfiles import read_runs

    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    held = read_runs(run_dir / "wandb")
    out = {}
    for row in trials.to_dict("records"):
        tid = row["trial_id"]
        mine = [h for run_id, h in held.items() if run_id.startswith(f"{tid}-")]
        assert len(mine) == 1, (tid, sorted(held))
        run = out[tid] = mine[0]
        table = epochs[epochs["trial_id"] == tid].sort_values("epoch").to_dict("records")
        assert [s for s, _ in run.rows] == [int(e["epoch"]) for e in table], tid
        for (step, logged), e in zip(run.rows, table):
            assert logged["epoch"] == step
            for col, value in e.items():
                if col in ("trial_id", "epoch") or isinstance(value, (str, bool)):
                    continue
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    continue
                if not math.isfinite(value):
                    continue
                if col in ("train_loss", "val_loss"):
                    want = value if exact else pytest.approx(value, rel=1e-6, abs=0)
                    assert logged[col] == want, (tid, step, col)
                elif col in ("epoch_time_s", "time_total_s"):
                    assert col in logged, (tid, step, col)
                else:
                    assert math.isclose(logged[col], value), (tid, step, col)
        assert run.summary["status"] == row["status"], tid
        assert run.summary["best_val_loss"] == pytest.approx(row["best_val_loss"]), tid
        assert run.exit_code == (1 if row["status"] == "ERROR" else 0), tid
    return out

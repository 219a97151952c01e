"""Faults of the run directory and of the processes around it, each on a real small sweep:
a full disk, a driver killed with its state file cut short, a torn checkpoint, two drivers,
trial processes killed at random. After each, the run ends with every trial finished and
every epoch's validation loss equal to that of an undisturbed run of the same spec."""

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
from helpers import epochs_reported, kill_running_at_random

from cae.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# 4 trials (latent 4 / 16 x convs 1 / 2), successive halving per latent size, 6 epochs of
# 3,600 images: long enough to be hit mid-way on two idle cores.
SPEC = {
    "name": "faults",
    "trial": {"data": {"dataset": "sample", "train_limit": 4000},
              "model": {"channels": [4, 8], "dense": [32], "latent_dim": 8},
              "max_epochs": 6, "patience": None},
    "space": {"model.latent_dim": {"grid": [4, 16]}, "model.convs": {"grid": [1, 2]}},
    "scheduler": {"kind": "sha", "stratify": ["model.latent_dim"], "grace_period": 1,
                  "reduction_factor": 2},
    "max_failures": 3,
    "seed": 0,
}


def _spec_file(folder: Path, **changes) -> Path:
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return path


def _losses(run_dir: Path) -> dict[tuple, float]:
    """(latent, convs, epoch) -> validation loss, from the run's tables."""
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet").merge(
        trials[["trial_id", "model.latent_dim", "model.convs"]], on="trial_id")
    keys = zip(epochs["model.latent_dim"], epochs["model.convs"], epochs["epoch"])
    out = dict(zip(keys, epochs["val_loss"]))
    assert len(out) == len(epochs), "an epoch appears twice in epochs.parquet"
    return out


def _check_whole(run_dir: Path, undisturbed: dict) -> pd.DataFrame:
    """Every trial finished, each epoch once, and the losses of the undisturbed run."""
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}, trials["status"]
    assert trials["recorded"].all()
    assert _losses(run_dir) == undisturbed
    for d in run_dir.glob("run_trial_*"):
        history = max((json.loads(h.read_text()) for h in d.glob("checkpoint_*/history.json")),
                      key=lambda h: len(h["epochs"]), default=None)
        if history is not None:  # each epoch trained once, in order
            assert [e["epoch"] for e in history["epochs"]] == list(
                range(1, len(history["epochs"]) + 1))
    return trials


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("undisturbed")
    assert main(["sweep", str(_spec_file(folder)), "--storage", str(folder), "--name", "u",
                 "--no-report", "--report-every", "0"]) == 0
    losses = _losses(folder / "u")
    assert len(losses) > 4 * 1  # halving stopped some trials, the best ran to the end
    return losses


def _start(spec: Path, storage: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cae.cli", "sweep", str(spec), "--storage", str(storage),
           "--name", name, "--no-report", "--report-every", "0"]
    return subprocess.Popen(cmd, cwd=storage, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (Ray's, its trials' workers), as a
    crash of its machine would: a worker left alive would go on writing checkpoints."""
    import psutil

    try:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_for(check, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _resume(run_dir: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["resume", str(run_dir), "--no-report", "--report-every", "0"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.mark.parametrize(("copy", "torn"), [("kept", "experiment_state"),
                                           ("lost", "searcher-state")])
def test_a_killed_driver_and_a_torn_state_lose_nothing(tmp_path, undisturbed, capsys, copy, torn):
    """A state file cut short (the experiment state by half, or the searcher's pickle left
    empty, as a full disk leaves them); with cae's last good copy of the session the run goes
    on from that copy, without one every trial takes its own directory over again. (Which
    file is torn does not change what the repair does: tests/test_recorded_run.py checks the
    other two pairings.)"""
    run_dir = tmp_path / "k"
    proc = _start(_spec_file(tmp_path), tmp_path, "k")
    _wait_for(lambda: epochs_reported(run_dir) >= 6, "six reported epochs")
    _kill_driver(proc)  # the driver and the Ray it started, as in a crash
    state = max(run_dir.glob(f"{torn}-*"))
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2] if torn == "experiment_state" else b"")
    if copy == "lost":
        shutil.rmtree(run_dir / ".cae-state", ignore_errors=True)

    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "interrupted" in out, out
    assert f"{state.name} could not be read" in out, out
    rc, said = _resume(run_dir, capsys)
    assert rc == 0, said
    assert f"{state.name} could not be read" in said and "taking over the run directory" in said
    if copy == "lost":
        assert "no earlier state" in said, said
    _check_whole(run_dir, undisturbed)
    assert (run_dir / f"{state.name}.torn").is_file()


def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(tmp_path, undisturbed, capsys):
    """A stratum's winner (which runs to the end, so it certainly goes on after the resume)
    is caught with two checkpoints; its newest is cut short."""
    run_dir = tmp_path / "t"
    winners = {(lat, convs) for (lat, convs, epoch) in undisturbed if epoch == 6}
    proc = _start(_spec_file(tmp_path), tmp_path, "t")

    def winner_with_two_checkpoints() -> Path | None:
        for d in run_dir.glob("run_trial_*"):
            record = d / "trial.json"
            if not record.is_file():
                continue
            model = json.loads(record.read_text())["config"]["model"]
            histories = [json.loads(h.read_text()) for h in d.glob("checkpoint_*/history.json")]
            if (model["latent_dim"], model["convs"]) in winners and len(histories) >= 2 \
                    and not any(h.get("final") for h in histories):
                return d
        return None

    _wait_for(lambda: winner_with_two_checkpoints() is not None,
              "a winner with two checkpoints", timeout=600)
    _kill_driver(proc)
    trial = winner_with_two_checkpoints()
    assert trial is not None
    newest = max(trial.glob("checkpoint_*"),
                 key=lambda c: len(json.loads((c / "history.json").read_text())["epochs"]))
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 3])
    rc, said = _resume(run_dir, capsys)
    assert rc == 0, said
    assert f"{newest.name}: state.pt unreadable" in said, said
    _check_whole(run_dir, undisturbed)


def test_trial_processes_killed_at_random_lose_nothing(tmp_path, undisturbed):
    """A running trial's worker is SIGKILLed after every third epoch reported (a random one
    of those running), three times; Tune retries each from its last checkpoint."""
    run_dir = tmp_path / "c"
    proc = _start(_spec_file(tmp_path), tmp_path, "c")
    kills = kill_running_at_random(proc, run_dir, "*", every=3, first_at=2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert kills >= 2, "too few kills landed"
    _check_whole(run_dir, undisturbed)


def _tmpfs(path: Path, mib: int):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, 48)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_too_little_room_is_refused_before_anything_starts(tmp_path, capsys):
    disk = tmp_path / "tiny"
    _tmpfs(disk, 4)
    try:
        rc = main(["sweep", str(REPO / "sweeps" / "quickstart.yaml"), "--storage", str(disk)])
        err = capsys.readouterr().err
        assert rc == 2
        assert "MiB free" in err and "this sweep writes about" in err, err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_sweep_and_resume_finishes_it(small_disk, undisturbed, capsys):
    run_dir = small_disk / "f"
    proc = _start(_spec_file(small_disk.parent), small_disk, "f")
    _wait_for(lambda: epochs_reported(run_dir) >= 2, "two reported epochs")
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave under 64 KiB: the next checkpoints cannot be written
        try:
            while shutil.disk_usage(small_disk).free > 64 * 1024:
                f.write(b"\0" * min(2**20, shutil.disk_usage(small_disk).free - 32 * 1024))
                f.flush()
        except OSError:
            pass  # the sweep wrote meanwhile: the disk is full all the same
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("cae: error: ") and "is full" in last and "cae resume" in last, err
    assert "Traceback" not in err, err
    filler.unlink()
    rc, said = _resume(run_dir, capsys)
    assert rc == 0, said
    _check_whole(run_dir, undisturbed)

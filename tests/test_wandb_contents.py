"""What W&B holds of a sweep, read from its own offline files (``cae.track.wandbfiles``),
not only which files there are: each trial's history holds every epoch once, with its
values, also when the driver is killed (SIGKILL, W&B's service losing what it had not
written yet) and the sweep resumed, or sent again with ``cae track``.

The reader is checked against files the installed ``wandb`` writes (records across blocks,
files cut short anywhere); the tracker against a real kill of a process that sends runs
(fast, no Ray) and of a sweep's driver (slow)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import check_wandb_history, epochs_reported

from cae.cli import main
from cae.track.runs import FINISHED, RUNNING, TrialRun
from cae.track.wandbfiles import (
    BLOCK,
    HEADER,
    WandbFileError,
    ends_its_run,
    read_file,
    read_runs,
    record_bytes,
    run_files,
)
from cae.track.wandbtracker import WandbTracker

TESTS = Path(__file__).resolve().parent
QUICK = str(TESTS.parent / "sweeps" / "quickstart.yaml")
QUIET = {"WANDB_ERROR_REPORTING": "false", "DO_NOT_TRACK": "true"}  # nothing leaves here
for _key, _value in QUIET.items():
    os.environ.setdefault(_key, _value)


def _settings():
    import wandb

    return wandb.Settings(silent=True, console="off", x_disable_stats=True,
                          x_disable_meta=True, x_disable_machine_info=True, save_code=False,
                          disable_git=True, x_save_requirements=False)


def _written(root: Path, rows: list[dict], run_id: str = "r1") -> Path:
    """A run file written by the installed wandb (offline): ``rows`` logged at steps 1, 2,
    ..., then finished, and written to its end."""
    import wandb

    run = wandb.init(project="p", id=run_id, dir=str(root), mode="offline",
                     reinit="create_new", settings=_settings())
    for step, row in enumerate(rows, 1):
        run.log(row, step=step)
    run.summary.update({"best": 0.125, "status": "TERMINATED"})
    run.finish()
    (path,) = run_files(root / "wandb")[run_id]
    deadline = time.time() + 60  # its last records come a moment after finish returns
    while not ends_its_run(path) and time.time() < deadline:
        time.sleep(0.02)
    return path


# ---- the reader ------------------------------------------------------------------------------


def test_the_reader_reads_what_wandb_wrote_records_across_blocks_included(tmp_path):
    # 60,000 characters a row: every row is a record over two or three blocks
    rows = [{"loss": 1 / 3 + step, "big": "x" * 60_000, "n": step} for step in range(1, 5)]
    rows.append({"loss": 0.1, "n": 5})
    path = _written(tmp_path, rows)
    assert path.stat().st_size > 4 * BLOCK
    got = read_file(path)
    assert [s for s, _ in got.rows] == [1, 2, 3, 4, 5]
    for (step, logged), row in zip(got.rows, rows):
        assert {k: logged[k] for k in row} == row and logged["_step"] == step
    assert got.summary["best"] == 0.125 and got.summary["status"] == "TERMINATED"
    assert got.summary["loss"] == 0.1  # W&B's own summary of the history: the last value
    assert got.exit_code == 0


def test_a_file_cut_short_anywhere_reads_as_its_whole_records(tmp_path):
    rows = [{"loss": step / 7, "pad": "y" * 9_000} for step in range(1, 13)]
    path = _written(tmp_path, rows)
    data = path.read_bytes()
    whole = list(record_bytes(data))
    cuts = sorted({*range(0, len(data), 331), *(b + d for b in range(BLOCK, len(data), BLOCK)
                                                for d in (-8, -7, -1, 0, 1, 7, 8))})
    for cut in cuts:
        got = list(record_bytes(data[:cut]))
        assert got == whole[:len(got)], cut  # a prefix: no record torn, none made up
        steps = [s for s, _ in read_file(_copy(tmp_path, data[:cut])).rows]
        assert steps == list(range(1, len(steps) + 1)), cut
    assert list(record_bytes(data[:HEADER.size])) == [] == list(record_bytes(b""))
    with pytest.raises(WandbFileError, match="not a W&B run file"):
        list(record_bytes(b"LEVELDB" + data[HEADER.size:]))


def test_a_damaged_chunk_costs_its_block_only(tmp_path):
    rows = [{"loss": step / 7, "pad": "z" * 3_000} for step in range(1, 40)]
    data = bytearray(_written(tmp_path, rows).read_bytes())
    whole = list(record_bytes(bytes(data)))
    data[HEADER.size + 20] ^= 0xFF  # inside the first block's first chunk
    got = list(record_bytes(bytes(data)))
    assert 0 < len(got) < len(whole) and got == whole[len(whole) - len(got):]


def _copy(folder: Path, data: bytes) -> Path:
    path = folder / "cut" / "run-cut.wandb"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


# ---- the tracker against a kill ------------------------------------------------------------


def _trial(tid: str, epochs: int, state: str, first: int = 1) -> TrialRun:
    """A trial's tracker run with epochs ``first``..``epochs``, 24 metrics an epoch (so that
    a long one fills several of W&B's blocks)."""
    steps = {e: {"train_loss": 1 / (e + 1), "val_loss": 1 / (e + 2) + 1e-9 * e,
                 **{f"err_{k}": k / (e + 3) for k in range(22)}}
             for e in range(first, epochs + 1)}
    status = "TERMINATED" if state == FINISHED else "RUNNING"
    return TrialRun(tid, tid, {"model.latent_dim": "4"}, {"status": status}, steps,
                    {"best_val_loss": 1 / (epochs + 2), "epochs": float(epochs)}, state)


# trial id -> epochs: one short, one long enough for W&B to write some blocks, one ended
TRIALS = {"aaaa0001": 3, "bbbb0002": 400, "cccc0003": 2}


def _tracker(root: Path) -> WandbTracker:
    return WandbTracker("cae-test", None, "offline", "g", "killed", root)


def _send_and_wait(root: str) -> None:
    """In a process of its own: the runs sent as a live sweep sends them (two open, one
    ended), then waits to be killed."""
    tracker = _tracker(Path(root))
    for tid, epochs in TRIALS.items():
        tracker.trial(_trial(tid, epochs, FINISHED if tid == "cccc0003" else RUNNING))
    print("sent", flush=True)
    time.sleep(600)


def _held(root: Path) -> dict[str, list[int]]:
    """Trial id -> the steps W&B's files hold of its run, in the order written."""
    return {run_id.split("-")[0]: [s for s, _ in h.rows]
            for run_id, h in read_runs(root / "wandb").items()}


def test_epochs_that_a_killed_wandb_service_lost_are_sent_again_and_none_twice(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
            f"from test_wandb_contents import _send_and_wait; _send_and_wait({str(tmp_path)!r})")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # a service of its
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**env, **QUIET})  # own, as a driver
    try:
        assert proc.stdout.readline().strip() == "sent"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its W&B service, as in a crash
        proc.wait()
    deadline = time.time() + 60  # the service sees its parent gone and stops (unwritten)
    while time.time() < deadline and _services_of(proc.pid):
        time.sleep(0.2)
    before = _held(tmp_path)
    assert before["cccc0003"] == [1, 2]  # ended: written whole
    assert before.get("aaaa0001", []) == []  # its file holds W&B's header alone
    long = before.get("bbbb0002", [])
    assert long == list(range(1, len(long) + 1)) and len(long) < 400  # some blocks of it

    # a resumed sweep: the live feed brings the trials' new epochs first (a gap after what
    # the files hold: they wait), then the tables bring every epoch
    tracker = _tracker(tmp_path)
    tracker.trial(_trial("aaaa0001", 5, RUNNING, first=4))
    assert _held(tmp_path).get("aaaa0001", []) == []
    for tid, epochs in TRIALS.items():
        tracker.trial(_trial(tid, epochs, FINISHED))
    tracker.close()
    after = read_runs(tmp_path / "wandb")
    for run_id, held in after.items():
        tid = run_id.split("-")[0]
        want = _trial(tid, TRIALS[tid], FINISHED)
        assert [s for s, _ in held.rows] == sorted(want.steps), tid  # each epoch once
        for step, logged in held.rows:
            assert {k: logged[k] for k in want.steps[step]} == want.steps[step]
        assert held.summary["best_val_loss"] == want.summary["best_val_loss"]
        assert held.exit_code == 0
    folders = {r: len(h.files) for r, h in after.items()}
    assert folders[next(r for r in after if r.startswith("cccc0003"))] == 1  # nothing new

    again = _tracker(tmp_path)  # sent again (cae track): nothing is written
    for tid, epochs in TRIALS.items():
        again.trial(_trial(tid, epochs, FINISHED))
    again.close()
    assert {r: len(h.files) for r, h in read_runs(tmp_path / "wandb").items()} == folders


def _services_of(pid: int) -> list[int]:
    """W&B services started by the process ``pid`` that are still running."""
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].endswith("wandb-core") and str(pid) in cmd:
            out.append(proc.pid)
    return out


def test_a_failure_finishes_the_open_runs_and_reads_the_files_again(tmp_path):
    tracker = _tracker(tmp_path)
    tracker.trial(_trial("aaaa0001", 3, RUNNING))
    tracker.forget()  # as after a failed send: the open run is finished and read back
    assert _held(tmp_path)["aaaa0001"] == [1, 2, 3]
    tracker.trial(_trial("aaaa0001", 5, FINISHED))
    tracker.close()
    assert _held(tmp_path)["aaaa0001"] == [1, 2, 3, 4, 5]


# ---- a real sweep, killed and resumed --------------------------------------------------------


def _unfinished_trial_has_an_epoch(run_dir: Path, epochs: int) -> bool:
    import json

    for result in run_dir.glob("*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("epoch", epochs) < epochs:
            return True
    return False


@pytest.mark.slow
def test_a_killed_driver_resumed_leaves_every_epoch_in_wandb_once(tmp_path):
    run_dir = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    cmd = [sys.executable, "-m", "cae.cli", "sweep", QUICK, "--storage", str(tmp_path),
           "--name", "killed", "--no-report", "--set", "scheduler.kind=fifo",
           "--set", "trial.max_epochs=3", "--set", "trial.patience=null",
           "--set", "trial.data.train_limit=2000",
           "--set", "space.model.latent_dim={grid: [4, 8]}",
           "--set", "tracking.wandb.project=cae-test", "--set", "tracking.wandb.mode=offline"]
    with open(tmp_path / "console.txt", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT, env={**env, **QUIET})
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not (
                epochs_reported(run_dir) >= 4 and _unfinished_trial_has_an_epoch(run_dir, 3)):
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "console.txt").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, as in a crash
        proc.wait()
    reported = epochs_reported(run_dir)
    held = sum(len(h.rows) for h in read_runs(run_dir / "wandb").values())
    assert held < reported  # W&B's service lost epochs with the driver

    assert main(["resume", str(run_dir), "--no-report"]) == 0
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 8 and set(trials["status"]) == {"TERMINATED"}
    check_wandb_history(run_dir, exact=False)

"""The console of a sweep (progress bar or plain lines, one line per trial error), the live
report and ``cae status``: units on made-up trials and run directories, then real sweeps."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from cae.cli import main
from cae.config.spec import load_spec
from cae.results.status import Progress, config_text, duration, planned_trial_epochs, run_status
from cae.sweep.plan import check_spec

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "sweeps" / "quickstart.yaml")


# ---- units -------------------------------------------------------------------------------


def test_planned_trial_epochs_of_the_quickstart_is_what_halving_runs():
    """4 trials per latent size, rungs 1, 3, 9 of 12 epochs: 4x1 + 2x2 + 1x6 + 1x3 = 17 per
    latent size (the quickstart's measured 68 trial-epochs); FIFO runs everything."""
    spec = load_spec(QUICK)
    c = check_spec(spec)
    assert planned_trial_epochs(spec, c.n_trials, c.max_epochs, c.strata) == 4 * 17
    spec.scheduler.kind = "fifo"
    assert planned_trial_epochs(spec, c.n_trials, c.max_epochs) == 16 * 12


def test_progress_texts():
    p = Progress(total=16, max_epochs=192, planned=68,
                 counts={"done": 6, "running": 1, "paused": 5, "pending": 4, "errored": 0},
                 epochs=34, best=0.021298, best_config={"model.latent_dim": 32, "lr": 0.0123456,
                                                       "model.channels": [8, 16]},
                 elapsed=60.0, rate=34 / 60)
    assert p.counts_text() == "6/16 done, 1 running, 5 paused, 4 pending"
    assert p.left == pytest.approx(60.0)
    line = p.line(["model.latent_dim", "lr", "model.channels"])
    assert "34/192 trial-epochs" in line and "1:00 elapsed, ~1:00 left" in line
    assert "best val 0.02130 (model.latent_dim=32, lr=0.01235, model.channels=[8, 16])" in line
    assert duration(3725) == "1:02:05" and duration(None) == "?"
    assert config_text({"variant": {"a": 1}, "seed": 3}, ["variant"], short=True) == \
        'variant={"a": 1}'


def _trial(status, epoch, best, lr, error_file=None, trial_id="t1"):
    last = {"epoch": epoch, "best_val_loss": best} if epoch else {}
    return types.SimpleNamespace(status=status, last_result=last, config={"lr": lr, "seed": 1},
                                 trial_id=trial_id, error_file=error_file)


def test_callback_plain_lines_when_not_a_terminal_and_one_line_per_error(tmp_path):
    from cae.sweep.progress import ProgressCallback

    out = io.StringIO()
    cb = ProgressCallback("s", total=3, max_epochs=9, planned=9, axes=["lr"], stream=out,
                          tty=False, interval=0)
    cb.setup()
    cb.on_step_end(1, [_trial("RUNNING", 1, 0.5, 0.01)])
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1\nTraceback ...\n  line\ncae.train.loop.Diverged: train loss "
                     "became nan at epoch 2\n")
    bad = _trial("ERROR", 1, 0.9, 1e12, error_file=str(error), trial_id="bad1")
    cb.on_trial_error(2, [], bad)
    cb.on_experiment_end([_trial("TERMINATED", 3, 0.2, 0.01), bad])
    lines = out.getvalue().splitlines()
    assert lines[0] == ("s: 0/3 done, 1 running, 2 pending; 1/9 trial-epochs; 0:00 elapsed, "
                        "~? left; best val 0.50000 (lr=0.01)")
    errors = [ln for ln in lines if "bad1" in ln]
    assert errors == ["trial bad1 errored (lr=1e+12; epoch 1): cae.train.loop.Diverged: "
                      "train loss "
                      "became nan at epoch 2"]
    assert lines[-1].startswith("s: 1/3 done, 1 pending, 1 errored; 4/9 trial-epochs")
    assert "best val 0.20000 (lr=0.01)" in lines[-1]


def test_callback_draws_one_bar_on_a_terminal():
    from cae.sweep.progress import ProgressCallback

    out = io.StringIO()
    cb = ProgressCallback("s", total=2, max_epochs=6, planned=6, axes=["lr"], stream=out,
                          tty=True)
    cb.setup()
    cb.on_step_end(1, [_trial("RUNNING", 2, 0.5, 0.01)])
    cb.on_experiment_end([_trial("TERMINATED", 3, 0.2, 0.01, trial_id="a"),
                          _trial("TERMINATED", 3, 0.3, 0.02, trial_id="b")])
    text = out.getvalue()
    assert cb.lines == 0  # no plain lines
    redraws = text.split("\r")
    assert any("2/6 trial-epochs, 0/2 done, 1 running, 1 pending" in r for r in redraws)
    assert "6/6 trial-epochs, 2/2 done" in redraws[-1] and "|" in redraws[-1]
    assert text.count("\n") <= 2  # one line, redrawn in place


def test_the_callback_survives_pickling_with_the_run_config():
    """Tune pickles its run config (callbacks included) into tuner.pkl."""
    import pickle

    from cae.sweep.livereport import LiveReport
    from cae.sweep.progress import ProgressCallback

    cb = ProgressCallback("s", 2, 6, 6, ["lr"], stream=sys.stdout,
                          live=LiveReport("/nowhere", 5))
    again = pickle.loads(pickle.dumps(cb))
    assert again.total == 2 and again.live.every == 5 and again.stream is sys.stdout


def test_a_failing_live_report_is_one_line_and_never_raises(tmp_path):
    from cae.sweep.livereport import LiveReport

    said = []
    live = LiveReport(str(tmp_path / "not-a-run"), every=1, say=said.append)
    assert live.write() is None
    assert len(said) == 1 and "live report could not be written" in said[0]
    live.tick(now=time.monotonic() + 5)  # in a thread
    live.finish(rewrite=False)
    assert len(said) == 2 and live.written == 0


def _fake_run(root: Path, statuses: list[tuple[str, int]], ago: float = 10.0) -> Path:
    """A run directory as Ray Tune leaves it: spec, experiment state, trial folders."""
    spec = {"name": "fake", "trial": {"data": {"dataset": "sample"}, "max_epochs": 3,
                                      "model": {"channels": [4, 8], "latent_dim": 8}},
            "space": {"lr": {"grid": [0.001, 0.01, 0.1]}}, "scheduler": {"kind": "fifo"}}
    root.mkdir(parents=True)
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    now = time.time()
    trial_data = []
    for i, (lr, (status, epochs)) in enumerate(zip((0.001, 0.01, 0.1), statuses)):
        name = f"run_trial_t{i}_{i + 1}_lr={lr}"
        d = root / name
        d.mkdir()
        (d / "params.json").write_text(json.dumps({"lr": lr}))
        lines = [{"epoch": e, "train_loss": 0.6 / e, "epoch_time_s": 2.0,
                  "val_loss": 0.5 / e / (i + 1), "best_val_loss": 0.5 / e / (i + 1),
                  "trial_id": f"t{i}", "timestamp": now - ago, "time_total_s": 2.0 * e,
                  **({"stop_reason": "max_epochs"} if e == 3 else {})}
                 for e in range(1, epochs + 1)]
        (d / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
        trial_data.append([json.dumps({"relative_logdir": name, "status": status,
                                       "trial_id": f"t{i}"}), json.dumps({"num_failures": 0})])
    (root / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(
        {"trial_data": trial_data, "stats": {"start_time": now - 100}}))
    _hold(root, os.getpid())  # a live driver holds it (cae.run.lease)
    return root


def _hold(root: Path, pid: int) -> None:
    from cae.run.lease import LEASE_FILE

    now = time.time()
    (root / LEASE_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "started": now - 100, "heartbeat": now,
         "command": "cae sweep fake.yaml", "token": "t"}))


def test_status_of_a_run_directory_running_interrupted_finished(tmp_path, capsys):
    run = _fake_run(tmp_path / "r", [("TERMINATED", 3), ("RUNNING", 1)])
    status = run_status(str(run))
    assert status.state == "running" and status.unfinished == 2
    text = status.text()
    assert "trials: 1/3 done, 1 running, 1 pending" in text
    assert "trial-epochs: 4 of at most 9" in text
    assert "best val 0.16667 (lr=0.001)" in text
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _hold(run, int(gone.stdout))  # its driver was killed
    later = run_status(str(run))
    assert later.state == "interrupted" and f"cae resume {run}" in later.text()
    assert "(gone)" in later.text()
    done = _fake_run(tmp_path / "d", [("TERMINATED", 3)] * 3)
    assert main(["status", str(done)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{done}: finished") and "3/3 done" in out and "resume" not in out
    assert main(["status", str(tmp_path / "nothing")]) == 2


def test_status_and_live_report_of_a_run_at_a_uri(tmp_path, monkeypatch):
    """file:// is read through pyarrow's filesystems as s3:// and gs:// are: the status
    from the local mirror, the live report published next to the run."""
    from cae.sweep.livereport import LiveReport

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = _fake_run(tmp_path / "bucket" / "r", [("TERMINATED", 3), ("RUNNING", 1)])
    uri = f"file://{run}"
    status = run_status(uri)
    assert status.state == "running" and "1/3 done, 1 running, 1 pending" in status.text()
    said = []
    report = LiveReport(uri, every=300, say=said.append).write()
    assert said == [] and report is not None
    assert (run / "report.html").is_file() and (run / "trials.parquet").is_file()
    assert "Sweep fake" in (run / "report.html").read_text()


# ---- real sweeps -----------------------------------------------------------------------------

SMALL = ["--set", "trial.data.train_limit=600", "--set", "trial.max_epochs=4"]


def _cae(*args: str) -> list[str]:
    return [sys.executable, "-m", "cae.cli", *args]


@pytest.mark.slow
def test_quickstart_prints_a_few_plain_lines_not_rays_boxes(tmp_path):
    """Not a terminal: a plain progress line now and then, no per-trial boxes; the whole
    output of the quickstart's 16 trials is a few dozen lines at most."""
    proc = subprocess.run(_cae("sweep", QUICK, "--storage", str(tmp_path), "--name", "q",
                               *SMALL, "--no-report"),
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) < 40, proc.stdout
    progress = [ln for ln in lines if ln.startswith("quickstart: ") and "trial-epochs" in ln]
    assert len(progress) >= 2
    assert progress[-1].startswith("quickstart: 16/16 done;")
    assert not any(ch in proc.stdout + proc.stderr for ch in "╭│╰")
    assert "Trial status" not in proc.stdout
    assert main(["status", str(tmp_path / "q")]) == 0


@pytest.mark.slow
def test_a_trial_error_is_one_line(tmp_path):
    spec = {"name": "diverge",
            "trial": {"data": {"dataset": "sample", "train_limit": 300},
                      "model": {"channels": [4, 8], "latent_dim": 8,
                                "output_activation": "linear"},
                      "max_epochs": 2, "patience": None},
            "space": {"lr": {"grid": [0.003, 1.0e12]}}, "scheduler": {"kind": "fifo"},
            "max_failures": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(_cae("sweep", str(path), "--storage", str(tmp_path), "--name", "d",
                               "--no-report"),
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    errors = [ln for ln in proc.stdout.splitlines() if " errored (" in ln]
    assert len(errors) == 1, proc.stdout
    assert "lr=1e+12" in errors[0] and "loss became nan" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def _finished_trials(run_dir: Path) -> int:
    n = 0
    for path in run_dir.glob("run_trial_*/result.json"):
        lines = path.read_text().splitlines()
        n += bool(lines) and "stop_reason" in lines[-1]
    return n


@pytest.mark.slow
def test_live_report_and_status_of_a_running_then_interrupted_sweep(tmp_path):
    """The report is rewritten while the sweep runs and `cae status` follows it; once the
    driver is killed, status says the run was interrupted and how to continue it."""
    run_dir = tmp_path / "live"
    log = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen(
        _cae("sweep", QUICK, "--storage", str(tmp_path), "--name", "live", *SMALL,
             "--set", "scheduler.kind=fifo", "--set", "trial.patience=null",
             "--report-every", "2"),
        cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (
                (run_dir / "report.html").is_file() and _finished_trials(run_dir) >= 2):
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()
            time.sleep(0.5)
        assert (run_dir / "report.html").is_file(), "no live report was written"
        assert "Sweep quickstart" in (run_dir / "report.html").read_text()
        assert (run_dir / "trials.parquet").is_file()
        status = run_status(str(run_dir))
        assert status.state == "running", status.text()
        assert status.progress.counts["done"] >= 2 and status.progress.best is not None
        assert _finished_trials(run_dir) < 16, "the sweep should still be going"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
        log.close()
    deadline = time.time() + 300
    while time.time() < deadline and run_status(str(run_dir)).state != "interrupted":
        time.sleep(5)
    status = run_status(str(run_dir))
    assert status.state == "interrupted", status.text()
    assert status.unfinished > 0 and f"cae resume {run_dir}" in status.text()


def test_status_counts_elapsed_time_from_the_first_session(tmp_path):
    """After a resume the run has two sessions' state files, each with its own start: the
    elapsed time (and the rate made from every session's epochs) is since the first."""
    run = _fake_run(tmp_path / "r", [("TERMINATED", 3), ("RUNNING", 1)])
    first = json.loads((run / "experiment_state-2026-01-01_00-00-00.json").read_text())
    resumed = {**first, "stats": {"start_time": time.time() - 10}}
    (run / "experiment_state-2026-01-02_00-00-00.json").write_text(json.dumps(resumed))
    status = run_status(str(run))
    assert status.state == "running"
    assert status.progress.elapsed >= 100  # not the 10 s since the resume


def test_a_fused_sweep_under_halving_counts_its_members_and_says_who_diverged():
    """Packs overlap in members (a rung's survivors go on in new packs): the counts are the
    scheduler's (``member_fates``), and a member that diverged is one line, as a trial
    alone that diverged is."""
    from cae.sweep.progress import ProgressCallback

    out = io.StringIO()
    cb = ProgressCallback("s", total=6, max_epochs=18, planned=10, axes=["lr"], stream=out,
                          tty=False, interval=0)
    cb.setup()
    pack = types.SimpleNamespace(status="RUNNING", trial_id="p1", config={
        "pack": [{"lr": 0.1}, {"lr": 0.2}], "ids": ["m0", "m1"]},
        last_result={"epoch": 2, "member_epochs": 2, "best_val_loss": 0.4}, error_file=None)
    result = {"epoch": 2, "member_fates": {"done": 3, "running": 2, "paused": 1},
              "members": {"m0": {"epoch": 2, "trial": "p0_00", "error": "diverged: val "
                                 "loss became nan at epoch 2"}, "m1": {"epoch": 2}}}
    cb.on_trial_result(1, [pack], pack, result)
    cb.on_step_end(1, [pack, pack])  # two packs that share members
    lines = out.getvalue().splitlines()
    assert lines[0] == ("trial p0_00 of pack p1 errored (epoch 2): diverged: val loss "
                        "became nan at epoch 2")
    assert lines[1].startswith("s: 3/6 done, 2 running, 1 paused; 4/18 trial-epochs")
    alone = _trial("TERMINATED", 1, 0.9, 1e12, trial_id="bad")
    alone.last_result["stop_reason"] = "diverged"
    cb._fates = {}
    cb.on_trial_result(2, [alone], alone, {"epoch": 1, "stop_reason": "diverged",
                                          "error": "diverged: train loss became nan at "
                                                   "epoch 1"})
    cb.on_step_end(2, [alone])
    lines = out.getvalue().splitlines()
    assert lines[2] == ("trial bad errored (lr=1e+12; epoch 1): diverged: train loss became "
                        "nan at epoch 1")
    assert lines[3].startswith("s: 0/6 done, 5 pending, 1 errored")

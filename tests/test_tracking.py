"""Every trial in an experiment tracker: MLflow (a real ``mlflow server`` with a SQLite
store, started and stopped here) and W&B (offline: no account, no network).

Checked through ``MlflowClient``, W&B's own CLI and its offline files
(``tests/test_wandb_contents.py`` has more of them): one run per trial, its history equal
to ``epochs.parquet`` epoch by epoch, its params equal to ``trials.parquet``,
the sweep's parent run with the tables and the report; ``cae track`` twice, a driver killed
and resumed, a server killed mid-sweep: each epoch there once; ``cae track`` without Ray."""

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import check_wandb_history, free_port

from cae.cli import main
from cae.config.errors import UserError
from cae.config.spec import load_spec
from cae.track.runs import param_text, table_runs

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "sweeps" / "quickstart.yaml")
RECORDED = REPO / "tests" / "data" / "recorded-run"
# Nothing leaves this machine: MLflow's usage telemetry and W&B's error reports are off (the
# servers these tests talk to are on 127.0.0.1)
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
         "WANDB_ERROR_REPORTING": "false", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
         "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
for _key, _value in QUIET.items():
    os.environ.setdefault(_key, _value)
# A small sweep: 4 trials (latent 4 and 8, one or two convolutions), 2 epochs
TINY = ["--set", "trial.max_epochs=2", "--set", "trial.data.train_limit=300",
        "--set", "space.model.latent_dim={grid: [4, 8]}", "--set", "space.model.channels=[4, 8]"]


# ---- a real MLflow server --------------------------------------------------------------------


class Server:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and an artifact folder in
    ``folder``; the process group it starts is stopped by its pid."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def start(self, timeout: float = 300.0) -> "Server":
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - the server's own
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.folder)
        import urllib.request

        deadline = time.time() + timeout  # a fresh database is created and migrated first
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout:.0f} s: {self.log()}")

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """The server and the workers it started (its process group), by its pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow")).start()
    yield s
    s.stop()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sweep_runs(uri: str, experiment: str, run_name: str) -> tuple[dict, list]:
    """trial id -> its MLflow run, and the sweep's parent runs, of one run directory."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    found = c.search_runs([exp.experiment_id], f"tags.`cae.run` = '{run_name}'",
                          max_results=1000)
    trials, parents = {}, []
    for run in found:
        tid = run.data.tags.get("cae.trial_id")
        if tid:
            assert tid not in trials, f"two runs for trial {tid}"
            trials[tid] = run
        else:
            parents.append(run)
    return trials, parents


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((int(m.step), m.value) for m in client(uri).get_metric_history(run_id, key))


def check_against_tables(uri: str, experiment: str, run_dir: Path, finished: bool = True):
    """Every trial of the tables is one MLflow run whose params are its config columns and
    whose val_loss history is its epochs, each step once; the parent holds the tables."""
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    runs, parents = sweep_runs(uri, experiment, run_dir.name)
    assert set(runs) == set(trials["trial_id"])
    assert len(parents) == 1
    parent = parents[0]
    for row in trials.to_dict("records"):
        run = runs[row["trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        mine = epochs[epochs["trial_id"] == row["trial_id"]].sort_values("epoch")
        want = [(int(e), float(v)) for e, v in zip(mine["epoch"], mine["val_loss"])]
        assert history(uri, run.info.run_id, "val_loss") == want, row["trial_id"]
        steps = [s for s, _ in history(uri, run.info.run_id, "epoch")]
        assert steps == sorted(set(steps)) == [e for e, _ in want]  # each epoch once
        # every number the trial reported of an epoch is there (lr too, when trials report
        # it); Tune's own clock (time_total_s) is left out: an epoch reported again after a
        # crash has a later one in the table than the one sent when it was first reported
        for col in (c for c in mine.columns if c not in ("trial_id", "epoch", "time_total_s")):
            if not pd.api.types.is_numeric_dtype(mine[col]):
                continue
            logged = dict(history(uri, run.info.run_id, col))
            for e, v in zip(mine["epoch"], mine[col]):
                if not pd.isna(v):
                    assert math.isclose(logged[int(e)], float(v)), (col, e)
        params = run.data.params
        for key in ("model.latent_dim", "model.channels", "model.convs", "lr", "params",
                    "latent_size", "family", "data.dataset"):
            assert params[key] == param_text(row[key]), key
        assert run.data.tags["status"] == row["status"]
        assert run.data.tags["stop_reason"] == row["stop_reason"]
        assert math.isclose(run.data.metrics["best_val_loss"], row["best_val_loss"])
        if finished:
            assert run.info.status == ("FINISHED" if row["status"] == "TERMINATED" else "FAILED")
    files = {f.path for f in client(uri).list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "trials.parquet", "epochs.parquet"} <= files
    return runs, parent, files


# ---- the spec and the rows (no tracker) --------------------------------------------------------


def test_the_tracking_block_of_a_spec(tmp_path):
    spec = load_spec(QUICK, ["tracking.mlflow.uri=http://127.0.0.1:5000",
                             "tracking.wandb.project=cae", "tracking.wandb.mode=offline"])
    assert spec.tracking.mlflow.uri == "http://127.0.0.1:5000"
    assert spec.tracking.mlflow.experiment is None  # the sweep's name, where it is used
    assert spec.tracking.wandb.mode == "offline" and spec.tracking.named() == ["mlflow", "wandb"]
    assert load_spec(QUICK).tracking.named() == []
    for bad, said in ((["tracking.mlflow.uri=./mlruns"], "file store"),
                      (["tracking.mlflow.uri=file:///tmp/mlruns"], "file store"),
                      (["tracking.wandb.project=p", "tracking.wandb.mode=later"], "mode"),
                      (["tracking.neptune.project=p"], "neptune")):
        with pytest.raises(UserError, match=said):
            load_spec(QUICK, bad)


def test_table_rows_become_tracker_runs():
    trials = pd.read_parquet(RECORDED / "trials.parquet")
    epochs = pd.read_parquet(RECORDED / "epochs.parquet")
    epochs["lr"] = 0.001  # a per-epoch column trials report comes along as a metric
    epochs["speculative"] = [None, 1.0, None, None]  # the scheduler's mark on work ahead
    runs = {r.trial_id: r for r in table_runs(trials, epochs, ["model.latent_dim"])}
    assert set(runs) == set(trials["trial_id"])
    row = trials.iloc[0].to_dict()
    run = runs[row["trial_id"]]
    assert run.name == f"{row['trial_id']} latent_dim={row['model.latent_dim']}"
    config = [c for c in trials.columns if c.startswith(("model.", "data.", "task."))]
    assert {c: run.params[c] for c in config} == {c: param_text(row[c]) for c in config}
    assert {"params", "latent_size", "family"} <= set(run.params)
    assert not {"best_val_loss", "status", "trial_id"} & set(run.params)
    assert sorted(run.steps) == [1, 2]
    assert {"train_loss", "val_loss", "epoch_time_s", "lr", "trained_ahead"} <= set(run.steps[1])
    assert [run.steps[e]["trained_ahead"] for e in (1, 2)] == [0.0, 1.0]
    assert run.summary["best_val_loss"] == row["best_val_loss"]
    assert run.summary["test_loss"] == row["test_loss"]
    assert run.tags["status"] == "TERMINATED" and run.state == "finished"


def test_a_tracker_whose_package_is_missing_is_one_error_before_ray(monkeypatch, tmp_path,
                                                                    capsys):
    import ray

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    rc = main(["sweep", QUICK, "--storage", str(tmp_path), "--name", "x",
               "--set", "tracking.wandb.project=p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["cae: error: tracking.wandb: the wandb package is not installed: "
                   "pip install 'cae-sweep[wandb]'"]
    assert not ray.is_initialized() and not (tmp_path / "x").exists()


class FlakyTracker:
    """A tracker that refuses its first ``fail`` sends, or takes ``delay`` seconds a send."""

    kind, label, errors = "fake", "the fake tracker", (ConnectionError,)

    def __init__(self, fail: int = 0, delay: float = 0.0):
        self.fail, self.delay, self.got, self.forgotten = fail, delay, {}, 0

    def trial(self, run):
        time.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("connection refused")
        self.got[run.trial_id] = run

    def sweep(self, run):
        pass

    def forget(self):
        self.forgotten += 1

    def close(self):
        pass


def _runs(n: int = 3, epoch: int = 1):
    trials = pd.read_parquet(RECORDED / "trials.parquet")
    epochs = pd.read_parquet(RECORDED / "epochs.parquet")
    return table_runs(trials, epochs[epochs["epoch"] == epoch], [], sweep_running=True)[:n]


def test_a_feed_keeps_what_a_failing_tracker_did_not_take_and_says_so_once():
    from cae.track.feed import Feed

    said, tracker = [], FlakyTracker(fail=1)
    feed = Feed(tracker, said.append, retry_s=600)
    feed.put(_runs(epoch=1))
    _until(lambda: feed.failure is not None, 30, "the first send")
    feed.put(lambda: _runs(epoch=2))  # made on the feed's thread, merged with what waits
    feed.put(lambda: _runs(epoch=2))  # (not sent until the retry: at the close here)
    assert feed.close(wait_s=30) == 0
    assert len(said) == 1 and "the fake tracker did not take" in said[0]
    assert tracker.forgotten == 1 and set(tracker.got) == {"0e284241", "a32044ca"}
    assert all(sorted(run.steps) == [1, 2] for run in tracker.got.values())


def test_a_slow_or_broken_tracker_does_not_hold_the_sweep(monkeypatch):
    from cae.track.feed import Feed

    reported = []  # what a thread that broke prints (its traceback, with the bug)
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_type))

    slow = Feed(FlakyTracker(delay=30), lambda text: None)
    slow.put(_runs())
    start = time.monotonic()
    assert slow.close(wait_s=0.5) >= 1  # not sent yet: said so, not waited for
    assert time.monotonic() - start < 5

    class Broken(FlakyTracker):
        def trial(self, run):
            raise TypeError("a bug")  # not a tracker's error: the thread's traceback says so

    broken = Feed(Broken(), lambda text: None)
    broken.put(_runs())
    assert broken.close(wait_s=10) >= 1 and reported == [TypeError]


# ---- cae track ----------------------------------------------------------------------------


@pytest.fixture
def recorded(tmp_path) -> Path:
    run = tmp_path / "recorded-run"
    shutil.copytree(RECORDED, run)
    return run


def test_cae_track_twice_leaves_each_epoch_once(server, recorded, capsys):
    for _ in range(2):
        assert main(["track", str(recorded), "--mlflow", server.uri]) == 0
    assert "2 trials" in capsys.readouterr().out
    runs, parent, _ = check_against_tables(server.uri, "recorded", recorded)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2
    for run in runs.values():  # the end values once, not once per cae track
        assert len(history(server.uri, run.info.run_id, "best_val_loss")) == 1


def test_cae_track_works_without_ray(server, recorded):
    code = ("import sys; sys.modules['ray'] = None\nfrom cae.cli import main\n"
            f"sys.exit(main(['track', {str(recorded)!r}, '--mlflow', {server.uri!r}, "
            "'--experiment', 'no-ray']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **QUIET})
    assert out.returncode == 0, out.stderr
    check_against_tables(server.uri, "no-ray", recorded)


def test_cae_track_to_a_tracker_that_is_down_says_what_was_not_sent(recorded, capsys):
    rc = main(["track", str(recorded), "--mlflow", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "did not take 3 of 3 runs" in err and f"cae track {recorded}" in err


def test_cae_track_to_wandb_offline_writes_each_run_once(recorded):
    args = ["track", str(recorded), "--wandb-project", "cae-test", "--wandb-mode", "offline"]
    assert main(args) == 0
    folders = sorted(p.name for p in (recorded / "wandb").glob("offline-run-*"))
    trials = pd.read_parquet(recorded / "trials.parquet")
    assert len(folders) == len(trials) + 1  # a run per trial, and the sweep's
    for tid in trials["trial_id"]:
        assert sum(f"-{tid}-" in f for f in folders) == 1
    assert main(args) == 0  # nothing new: nothing written again
    assert sorted(p.name for p in (recorded / "wandb").glob("offline-run-*")) == folders
    listed = wandb_dry_run(recorded)
    for folder in folders:
        assert folder.split("-", 3)[-1] in listed
    check_wandb_history(recorded)


def wandb_dry_run(run_dir: Path) -> str:
    """What ``wandb sync --dry-run`` (no network) would upload from a run directory."""
    out = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run"], cwd=run_dir,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **QUIET})
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


# ---- live, from a sweep's driver ------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_sends_every_trial_to_mlflow_as_it_runs(server, tmp_path, capsys):
    rc = main(["sweep", QUICK, "--storage", str(tmp_path), "--name", "live", *TINY,
               "--set", f"tracking.mlflow.uri={server.uri}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "did not take" not in out.out + out.err
    runs, parent, files = check_against_tables(server.uri, "quickstart", tmp_path / "live")
    assert len(runs) == 4 and "report.html" in files
    assert parent.info.status == "FINISHED"
    (tmp_path / "got").mkdir()
    got = client(server.uri).download_artifacts(parent.info.run_id, "spec.yaml",
                                                str(tmp_path / "got"))
    assert yaml.safe_load(Path(got).read_text())["tracking"]["mlflow"]["uri"] == server.uri
    names = {run.info.run_name for run in runs.values()}
    assert any("latent_dim=8" in n and "convs=2" in n for n in names), names


def _until(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_epochs(uri: str, experiment: str, run_name: str) -> int:
    try:
        runs, _ = sweep_runs(uri, experiment, run_name)
    except Exception:  # the experiment is not there yet, or the server is going away
        return 0
    return sum(len(history(uri, r.info.run_id, "epoch")) for r in runs.values())


def _driver(tmp_path: Path, name: str, uri: str, console: Path) -> subprocess.Popen:
    """A sweep long enough to be caught mid-way: 8 trials, 3 epochs, FIFO."""
    cmd = [sys.executable, "-m", "cae.cli", "sweep", QUICK, "--storage", str(tmp_path),
           "--name", name, "--no-report", "--set", "scheduler.kind=fifo",
           "--set", "trial.max_epochs=3", "--set", "trial.patience=null",
           "--set", "trial.data.train_limit=2000",
           "--set", "space.model.latent_dim={grid: [4, 8]}",
           "--set", f"tracking.mlflow.uri={uri}"]
    with open(console, "wb") as out:
        return subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **QUIET})


@pytest.mark.slow
def test_a_killed_driver_resumed_keeps_one_run_per_trial_and_each_epoch_once(server, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _driver(tmp_path, "killed", server.uri, tmp_path / "console.txt")
    try:
        _until(lambda: _logged_epochs(server.uri, "quickstart", "killed") >= 4, 300,
               "epochs in MLflow")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, as in a crash
        proc.wait()
    before, _ = sweep_runs(server.uri, "quickstart", "killed")
    assert before and any(r.info.status == "RUNNING" for r in before.values())

    assert main(["resume", str(run_dir), "--no-report"]) == 0
    runs, parent, _ = check_against_tables(server.uri, "quickstart", run_dir)
    assert len(runs) == 8 and parent.info.status == "FINISHED"
    for tid, run in before.items():  # the runs the first driver made went on
        assert runs[tid].info.run_id == run.info.run_id


@pytest.mark.slow
def test_a_server_killed_mid_sweep_costs_a_warning_then_cae_track_fills_in(tmp_path):
    own = Server(tmp_path / "mlflow").start()
    console = tmp_path / "console.txt"
    try:
        proc = _driver(tmp_path, "orphan", own.uri, console)
        _until(lambda: _logged_epochs(own.uri, "quickstart", "orphan") >= 2, 300,
               "epochs in MLflow")
        own.stop(signal.SIGKILL)  # the tracker is gone; the sweep goes on
        assert proc.wait(timeout=600) == 0
        said = console.read_text()
        warnings = [ln for ln in said.splitlines() if "did not take the sweep's runs" in ln]
        assert len(warnings) == 1, said
        assert f"send them with: cae track {tmp_path / 'orphan'}" in said, said
        trials = pd.read_parquet(tmp_path / "orphan" / "trials.parquet")
        assert len(trials) == 8 and set(trials["status"]) == {"TERMINATED"}

        own.start()  # the same database, on a new port
        assert main(["track", str(tmp_path / "orphan"), "--mlflow", own.uri]) == 0
        check_against_tables(own.uri, "quickstart", tmp_path / "orphan")
    finally:
        own.stop()


@pytest.mark.slow
def test_a_sweep_writes_wandb_offline_runs_and_exits_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") or k == "WANDB_ERROR_REPORTING"}  # no key, no mode
    cmd = [sys.executable, "-m", "cae.cli", "sweep", QUICK, "--storage", str(tmp_path),
           "--name", "wb", "--no-report", *TINY, "--set", "tracking.wandb.project=cae-test",
           "--set", "tracking.wandb.mode=offline"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**env, **QUIET})
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend(
        (time.monotonic(), ln) for ln in proc.stdout))
    reader.start()
    assert proc.wait(timeout=600) == 0, "".join(ln for _, ln in lines)
    exited = time.monotonic()
    reader.join()
    said = "".join(ln for _, ln in lines)
    last = next(t for t, ln in lines if ln.startswith("run directory:"))
    # no upload to wait for (Ray's W&B logger waits up to 1,800 s for one at the end)
    assert exited - last < 60, said
    assert "wandb:" not in said, said  # W&B says nothing on the sweep's console
    run_dir = tmp_path / "wb"
    trials = pd.read_parquet(run_dir / "trials.parquet")
    folders = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]
    for tid in trials["trial_id"]:
        found = [f for f in folders if f"-{tid}-" in f]
        assert len(found) == 1, folders
        run_id = found[0].split("-", 3)[-1]
        assert (run_dir / "wandb" / found[0] / f"run-{run_id}.wandb").is_file()
    listed = wandb_dry_run(run_dir)
    for tid in trials["trial_id"]:
        assert f"-{tid}-" in listed, listed
    check_wandb_history(run_dir)  # W&B's own files: each epoch once, with its values

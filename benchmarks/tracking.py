"""What does tracking cost a sweep? The quickstart with and without an MLflow URI.

Both sides run ``cae sweep sweeps/quickstart.yaml`` as a user does (a fresh process, Ray
started in it, the report written at the end), with ``--set trial.max_epochs=N`` (default 4)
to keep a round short; the tracked side adds ``--set tracking.mlflow.uri=URI``, a real
``mlflow server`` (SQLite store, 127.0.0.1) started here on this same machine, so its work
competes with the sweep's (a team's server elsewhere costs the sweep less). The figure is
the wall time of the whole command, from its start to its exit (the trackers' last sends
and the artifacts included).

The sides alternate over ``--rounds`` (3: without first in odd rounds, with first in even
ones), so a change in the machine's load hits both; the load average is recorded at the
start and end of every run. ``ratio`` = the median tracked run's seconds / the median
untracked run's (goal <= 1.05). A tracked run counts only if MLflow then holds every trial
of it with every epoch of its ``epochs.parquet``.

    python benchmarks/tracking.py              # 3 rounds of the quickstart at 4 epochs
    python benchmarks/tracking.py --quick      # 1 round at 2 epochs, a smoke run

Writes ``benchmarks/results/tracking.json`` (``tracking-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

QUICKSTART = common.ROOT / "sweeps" / "quickstart.yaml"
# nothing leaves this machine: MLflow's usage telemetry off, on both sides alike
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` with a SQLite store in ``folder``, once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
           f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
           str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, **QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - the server's for its life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    """The server's process group, by the pid started here."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds the server and its workers have used so far (nan without psutil)."""
    try:
        import psutil
    except ImportError:
        return float("nan")

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def sweep(storage: Path, name: str, epochs: int, uri: str | None) -> dict:
    """One ``cae sweep`` of the quickstart; its wall time and the load around it."""
    cmd = [sys.executable, "-m", "cae.cli", "sweep", str(QUICKSTART), "--storage",
           str(storage), "--name", name, "--set", f"trial.max_epochs={epochs}"]
    if uri:
        cmd += ["--set", f"tracking.mlflow.uri={uri}"]
    load = os.getloadavg()[0]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT,
                         env={**os.environ, **QUIET}, timeout=3600)
    seconds = time.monotonic() - start
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed ({out.returncode}): {out.stderr[-3000:]}")
    warned = [ln for ln in (out.stdout + out.stderr).splitlines() if "did not take" in ln]
    return {"name": name, "tracked": bool(uri), "seconds": round(seconds, 2),
            "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2),
            "tracker_warnings": warned}


def check_tracked(uri: str, run_dir: Path) -> dict:
    """What MLflow holds of a tracked run against its tables: trials and epochs."""
    import pandas as pd
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id], f"tags.`cae.run` = '{run_dir.name}'",
                              max_results=1000)
    trial_runs = [r for r in runs if r.data.tags.get("cae.trial_id")]
    epochs = sum(len(client.get_metric_history(r.info.run_id, "epoch")) for r in trial_runs)
    table = pd.read_parquet(run_dir / "epochs.parquet")
    return {"trial_runs": len(trial_runs), "epochs_logged": epochs,
            "epochs_in_tables": len(table), "complete": epochs == len(table)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4, help="trial.max_epochs of the quickstart")
    ap.add_argument("--quick", action="store_true", help="1 round at 2 epochs")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.epochs = 1, 2
    started, info = common.now(), common.machine()
    os.environ.update(QUIET)
    runs, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="cae-bench-tracking-") as tmp:
        tmp = Path(tmp)
        (tmp / "mlflow").mkdir()
        server, uri = start_server(tmp / "mlflow")
        try:
            cpu_before = server_cpu(server)
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                for tracked in order:
                    name = f"{'mlflow' if tracked else 'plain'}-{r + 1}"
                    run = sweep(tmp / "runs", name, args.epochs, uri if tracked else None)
                    if tracked:
                        checks[name] = run["check"] = check_tracked(uri, tmp / "runs" / name)
                    runs.append(run)
                    print(f"{name}: {run['seconds']:.1f} s (load {run['load_start']:.1f} -> "
                          f"{run['load_end']:.1f})", flush=True)
            cpu_server = server_cpu(server) - cpu_before
        finally:
            stop_server(server)
    plain = common.median([r["seconds"] for r in runs if not r["tracked"]])
    tracked = common.median([r["seconds"] for r in runs if r["tracked"]])
    ratio = tracked / plain
    figures = {
        "what": "cae sweep sweeps/quickstart.yaml --set trial.max_epochs=N in a fresh process, "
                "with and without --set tracking.mlflow.uri=<a local mlflow server, SQLite "
                "store>; wall time of the command; sides alternating; ratio = median tracked "
                "/ median untracked",
        "epochs": args.epochs, "rounds": args.rounds,
        "median_untracked_s": round(plain, 2), "median_tracked_s": round(tracked, 2),
        "ratio": round(ratio, 4), "goal": "<= 1.05", "within_goal": ratio <= 1.05,
        "server_cpu_s": round(cpu_server, 1),  # the whole benchmark: idle in untracked runs
        "every_tracked_run_complete": all(c["complete"] for c in checks.values()),
        "runs": runs,
    }
    path = common.write_results(common.results_path("tracking", args.quick), "tracking", info,
                                figures, started)
    print(common.table([(r["name"], r["seconds"], r["load_start"], r["load_end"])
                        for r in runs], ("run", "seconds", "load start", "load end")))
    print(f"ratio {ratio:.3f} (goal <= 1.05); every tracked run complete: "
          f"{figures['every_tracked_run_complete']}; wrote {path}")


if __name__ == "__main__":
    main()

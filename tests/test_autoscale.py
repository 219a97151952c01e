"""Autoscaling, for real on this machine: GPU workers added while trials wait, removed idle.

Ray's fake multi-node provider (``fake_multinode``) plays the cloud: it starts each worker
node as Ray processes on this machine when the autoscaler asks for one, and ends them when
it removes the node. The cluster is cluster.yaml's shape: a CPU-only head and one GPU worker
type with (logical) GPUs, min 0, max 2, here with an idle timeout of 15 seconds (at 6, a
node added while the trials start could be removed as idle before a trial was placed on it,
and then added again). A sweep of ``{cpu: 1, gpu: 0.25}`` trials is submitted to the head
alone: its pending trials make the autoscaler add the GPU workers, every trial finishes (on
the CPU: no CUDA device is behind a logical GPU, and ``device`` says so), and the workers
are removed once idle.

``ray.cluster_utils.AutoscalingCluster`` would do this, but its ``start()`` and
``shutdown()`` run ``ray stop --force``, which ends every Ray process on the machine, other
people's included; and Ray 2.60's wheel lacks the ``example.yaml`` it reads. So the head is
started here as AutoscalingCluster starts it (``ray start --head --autoscaling-config=...``
with ``RAY_FAKE_CLUSTER=1``), from a configuration written here, on ports and a temporary
directory of its own, and ended by process: its ``ray start`` (process group), then any
process left that names this cluster's Ray session. A separate Ray started before the test
(``ray.init()`` in another process) must still answer afterwards.

The storage rule of ``cae sweep`` (a local path is refused while no node can run a trial:
the nodes the autoscaler adds would not see it) is checked first, as a user meets it; the
sweep itself then runs with that check left out, because this cluster's "nodes" are
processes on one machine that do share its filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import free_port, processes_naming

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_CPUS = 1
WORKER = {"CPU": 4, "GPU": 1, "object_store_memory": 200 * 2**20}  # four 0.25-GPU trials
MAX_WORKERS = 2
SWEEP = ["sweep", "sweeps/quickstart.yaml", "--no-report", "--set", "resources.gpu=0.25",
         "--set", "resources.cpu=1", "--set", "space.model.convs=1",
         "--set", "trial.max_epochs=2", "--set", "trial.data.train_limit=1024",
         "--set", "scheduler.kind=fifo", "--set", "trial.patience=null"]
N_TRIALS = 8

# `cae sweep` with the storage check left out (see the module docstring)
SWEEP_SHARED_HERE = """
import sys
import cae.sweep.cluster
cae.sweep.cluster.check_shared_storage = lambda *args, **kwargs: None
from cae.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A driver that prints the cluster's alive nodes whenever they change.
OBSERVER = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
start, last = time.time(), None
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    gpu = sorted(n["NodeID"] for n in alive if n["Resources"].get("GPU"))
    if (len(alive), gpu) != last:
        last = (len(alive), gpu)
        print(json.dumps({"t": round(time.time() - start, 1), "alive": len(alive),
                          "gpu_workers": gpu}), flush=True)
    time.sleep(0.5)
"""

# Another Ray on this machine (someone else's): it must outlive this test's cluster.
BYSTANDER = """
import sys
import ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

@ray.remote
def square(x):
    return x * x

print("READY", flush=True)
for line in sys.stdin:
    print("PONG", ray.get(square.remote(int(line))), flush=True)
ray.shutdown()
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"  # a test cluster on 127.0.0.1, in its own ports
    env.update(extra)
    return env


def _config(gcs_address: str) -> dict:
    """The fake_multinode cluster config (what Ray's example.yaml held), in cluster.yaml's
    shape."""
    return {
        "cluster_name": "cae-autoscale-test",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {},
                                 "max_workers": 0},
            "gpu_worker": {"resources": dict(WORKER), "node_config": {}, "min_workers": 0,
                           "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _session(temp: Path, timeout: float = 60) -> str:
    """The head's Ray session name (in every command line of this cluster's processes)."""
    deadline = time.time() + timeout
    while not (temp / "session_latest").exists():
        assert time.time() < deadline, "the head wrote no session"
        time.sleep(0.2)
    return (temp / "session_latest").resolve().name


def _stop(head: subprocess.Popen, session: str | None) -> list[int]:
    """End this cluster: its `ray start` and process group, then the processes that name
    its session (the worker nodes the fake provider started inside the autoscaler).
    Returns the pids that had to be killed in the second step."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
    left = processes_naming(session) if session else []
    for pid in left:  # ours by construction: they name this cluster's session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture
def bystander():
    """Someone else's Ray on this machine, started before the cluster of the test."""
    proc = subprocess.Popen([sys.executable, "-c", BYSTANDER], cwd=ROOT, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "READY"
    yield proc
    proc.stdin.close()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _ping(proc: subprocess.Popen, x: int) -> str:
    proc.stdin.write(f"{x}\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_pending_gpu_trials_add_workers_that_are_removed_when_idle(bystander, tmp_path):
    start = time.time()
    assert _ping(bystander, 7) == "PONG 49"
    temp = Path(tempfile.mkdtemp(prefix="caeas", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    address = f"127.0.0.1:{port}"
    config = temp / "autoscaling.json"
    config.write_text(json.dumps(_config(address)))
    head_env = _env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                    RAY_TMPDIR=str(temp))
    with open(temp / "head.log", "w") as log:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--autoscaling-config={config}",
             "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={HEAD_CPUS}",
             "--num-gpus=0", f"--temp-dir={temp}/ray", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}",
             "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"],
            cwd=ROOT, env=head_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    session, observer, timeline = None, None, []
    try:
        session = _session(temp / "ray")
        while True:  # the GCS answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
                time.sleep(0.5)
        storage = tmp_path / "runs"
        cae = [sys.executable, "-m", "cae.cli", *SWEEP, "--address", address,
               "--storage", str(storage)]

        # as a user meets it: a local path, and no node that can run a trial yet
        refused = subprocess.run([*cae, "--name", "refused"], cwd=ROOT, env=_env(),
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "no node of the cluster can run a trial yet" in refused.stderr

        observer = subprocess.Popen([sys.executable, "-c", OBSERVER, address], cwd=ROOT,
                                    env=_env(), stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(observer.stdout), daemon=True)
        reader.start()
        sweep_start = time.time()
        res = subprocess.run([sys.executable, "-c", SWEEP_SHARED_HERE, *cae[3:],
                              "--name", "scaled"], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=600)
        sweep_s = time.time() - sweep_start
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

        deadline = time.time() + 180  # idle timeout 15 s, plus the autoscaler's rounds
        while True:
            timeline = [json.loads(line) for line in list(lines)]
            if timeline and timeline[-1]["alive"] == 1 and len(timeline) > 1:
                break
            assert time.time() < deadline, f"GPU workers not removed when idle: {timeline}"
            time.sleep(0.5)
        idle_s = time.time() - sweep_start - sweep_s
    finally:
        if observer is not None:
            observer.kill()
            observer.wait(10)
        killed = _stop(head, session)
        for log in (temp / "ray" / "session_latest" / "logs").glob("monitor.*"):
            shutil.copy(log, tmp_path)  # what the autoscaler did, kept with the test
        shutil.rmtree(temp, ignore_errors=True)

    print(f"\nsweep {sweep_s:.0f} s, workers removed {idle_s:.0f} s after it ended; "
          f"test {time.time() - start:.0f} s")
    print("alive nodes over time: " + "; ".join(
        f"{e['t']:.0f} s: {e['alive']} ({len(e['gpu_workers'])} GPU)" for e in timeline))
    workers = {w for e in timeline for w in e["gpu_workers"]}
    assert timeline[0]["alive"] == 1 and not timeline[0]["gpu_workers"], timeline  # head only
    assert max(len(e["gpu_workers"]) for e in timeline) == MAX_WORKERS, timeline
    assert timeline[-1]["alive"] == 1 and not timeline[-1]["gpu_workers"], timeline

    trials = pd.read_parquet(storage / "scaled" / "trials.parquet")
    assert len(trials) == N_TRIALS and set(trials["status"]) == {"TERMINATED"}, trials
    assert set(trials["device"]) == {"cpu"}  # logical GPUs: torch sees no CUDA device
    ran_on = set(trials["node_id"])
    assert ran_on <= workers, "a trial ran off the GPU workers"
    assert len(ran_on) == MAX_WORKERS, ran_on
    print(f"trials per GPU worker: {trials['node_id'].str[-5:].value_counts().to_dict()}")
    decisions = [line.split(" -- ", 1)[-1] for line in
                 (tmp_path / "monitor.log").read_text().splitlines()
                 if "Adding" in line or "Terminating" in line or "Removing" in line]
    print("autoscaler: " + "; ".join(decisions))

    # only this cluster's processes were ended: the other Ray still answers
    assert not processes_naming(session), "processes of the test's cluster are left"
    print(f"killed by session after the head stopped: {len(killed)} processes")
    assert _ping(bystander, 12) == "PONG 144"

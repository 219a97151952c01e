"""Sweeps on Ray clusters, for real on this machine.

- job submission: a local cluster (`ray start --head` on 127.0.0.1 with the job server and
  token authentication), `ray job submit ... -- cae sweep ...`, the run directory complete;
  only the processes this test started are stopped;
- several nodes (``ray.cluster_utils.Cluster``: a head that runs no trials and workers, all
  on this machine): trials spread over nodes; a worker lost mid-sweep, its trials resuming
  from their last checkpoints on another node;
- fractional GPUs on a node with one logical GPU: four trials at 0.25 running at once;
- the storage rule: a local path that one node cannot see is refused before any trial.
  That node is real: a worker started in its own mount namespace (``unshare``) with an
  empty tmpfs over the storage directory, so the driver's files are not there for it.

Every sweep runs as its own process (``python -m cae.cli``), as a user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pandas as pd
import pytest
from helpers import free_port, processes_naming

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SPEC = "sweeps/quickstart.yaml"
BIN = Path(sys.executable).parent
# 4 small trials, no early stopping of any kind: every trial runs its max_epochs
FOUR_TRIALS = [
    "--set", "scheduler.kind=fifo", "--set", "trial.patience=null",
    "--set", "trial.data.train_limit=1024",
    "--set", "space.model.channels=[4, 8]", "--set", "space.model.convs=1",
    "--set", "space.model.latent_dim={grid: [4, 8, 16, 32]}",
]
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                      "health_check_failure_threshold": 3}


# ---- helpers ----------------------------------------------------------------------------


def _env(**extra: str) -> dict:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `ray`, `cae` of this venv
    env.update(extra)
    return env


def _cae(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cae.cli", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _cae_async(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cae.cli", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _results(run_dir: Path) -> dict[str, list[dict]]:
    """Each trial's reported rows (Ray Tune's result.json), by short trial id."""
    out = {}
    for path in sorted(run_dir.glob("*/result.json")):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # being written
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _spawn(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a process in a new session (its own process group), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kwargs)


def _stop_group(proc: subprocess.Popen, grace: float = 60) -> None:
    """Stop a process started with start_new_session=True, and its process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


@pytest.fixture
def cluster():
    """A head that runs no trials (num_cpus=0) on 127.0.0.1; the test adds the workers.
    Shut down (its own nodes only) at the end."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS})
    yield c
    c.shutdown()


def _worker(c, **resources):
    return c.add_node(node_ip_address="127.0.0.1", **resources)


# ---- 1. ray job submit to a local cluster ---------------------------------------------------


def test_job_submission_to_a_local_cluster():
    """The README's flow: `ray start --head` (job server on 127.0.0.1, token auth), then
    `ray job submit --working-dir . -- cae sweep ...`; the job succeeds, the run directory
    is complete, and the Ray processes this test started are gone after it."""
    from cae.config.spec import load_spec
    from cae.sweep.plan import check_spec

    small = ["--set", "trial.max_epochs=2", "--set", "trial.data.train_limit=512"]
    n_trials = check_spec(load_spec(str(ROOT / SPEC), small[1::2])).n_trials
    tmp = Path(tempfile.mkdtemp(prefix="caejob", dir="/tmp"))  # short: Ray's socket paths
    token = uuid.uuid4().hex
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    dash = free_port()
    url = f"http://127.0.0.1:{dash}"
    head = _spawn(
        ["ray", "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={tmp}/ray", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", "--block"],
        tmp / "head.log", env=env)
    try:
        deadline = time.time() + 180
        while True:  # the job server answers: with the token, and only with it
            try:
                urlopen(Request(f"{url}/api/version",
                                headers={"Authorization": f"Bearer {token}"}), timeout=5)
                break
            except (OSError, HTTPError):
                assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
                assert time.time() < deadline, "job server did not come up"
                time.sleep(1)
        with pytest.raises(HTTPError) as unauth:
            urlopen(f"{url}/api/version", timeout=5)
        assert unauth.value.code == 401

        storage = tmp / "storage"
        job = subprocess.run(
            ["ray", "job", "submit", "--address", url, "--working-dir", ".", "--",
             "cae", "sweep", SPEC, "--storage", str(storage), "--name", "job", "--no-report",
             *small],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=480, check=False)
        out = job.stdout + job.stderr
        assert job.returncode == 0, _tail(out)
        assert "succeeded" in out
        run = storage / "job"
        assert (run / "spec.yaml").is_file()
        trials = pd.read_parquet(run / "trials.parquet")
        assert len(trials) == n_trials
        assert set(trials["status"]) == {"TERMINATED"}, trials["status"].value_counts()
        assert (run / "epochs.parquet").is_file()
        print(f"\njob: {len(trials)} trials TERMINATED in {run}")
    finally:
        _stop_group(head)
        time.sleep(1)
        left = processes_naming(str(tmp))
        for pid in left:  # ours by construction: they name this test's temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"processes left running after stopping the head: {left}"


# ---- 2. several nodes; a node lost mid-sweep ------------------------------------------------


def test_trials_spread_over_nodes_and_survive_a_lost_worker(cluster, tmp_path):
    """Two 1-CPU workers run four trials, two at a time. Once each worker has finished a
    trial and a second-round trial has reported epoch 2 or more, that trial's worker is
    killed (SIGKILL, like a lost spot instance). The lost trial resumes from its last
    checkpoint on the other worker, its epochs going on (at most the one epoch whose checkpoint
    was not yet registered is done again); the sweep completes with every trial finished;
    trials.parquet shows trials on more than one node."""
    w1, w2 = _worker(cluster, num_cpus=1), _worker(cluster, num_cpus=1)
    names = {cluster.head_node.node_id: "head", w1.node_id: "worker-1", w2.node_id: "worker-2"}
    storage, max_epochs = tmp_path / "storage", 10
    run = storage / "lost"
    sweep = _cae_async("sweep", SPEC, "--address", cluster.address, "--storage", str(storage),
                       "--name", "lost", "--no-report", *FOUR_TRIALS,
                       "--set", f"trial.max_epochs={max_epochs}")
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(sweep.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        victim = None
        workers = {w1.node_id: w1, w2.node_id: w2}
        while victim is None:  # a finished trial on each worker, and one mid-run
            assert sweep.poll() is None, "".join(output)[-4000:]
            assert time.time() < deadline, "no trial was mid-run after the first two ended"
            last = [rows[-1] for rows in _results(run).values()]
            done_on = {r["node_id"] for r in last if r["epoch"] == max_epochs}
            running = [r for r in last if 2 <= r["epoch"] < max_epochs - 1
                       and r["node_id"] in workers]
            if set(workers) <= done_on and running:
                victim = workers[running[0]["node_id"]]
            time.sleep(0.2)
        cluster.remove_node(victim, allow_graceful=False)
        lost_at = time.time()
        names[victim.node_id] += " (lost)"
        assert sweep.wait(timeout=420) == 0, "".join(output)[-4000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    reader.join(10)

    results = _results(run)
    trials = pd.read_parquet(run / "trials.parquet")
    spans = {}  # trial -> [[node, first epoch, last epoch], ...]
    for tid, rows in sorted(results.items()):
        spans[tid] = []
        for r in rows:
            if spans[tid] and spans[tid][-1][0] == r["node_id"]:
                spans[tid][-1][2] = r["epoch"]
            else:
                spans[tid].append([r["node_id"], r["epoch"], r["epoch"]])
    print(f"\nnode lost at {time.strftime('%H:%M:%S', time.localtime(lost_at))}: "
          f"{names[victim.node_id]}")
    for tid, sp in spans.items():
        print(f"  trial {tid}: " + "; ".join(
            f"epochs {a}-{b} on {names.get(n, n[:8])}" for n, a, b in sp))

    assert len(trials) == 4 == len(results)
    assert set(trials["status"]) == {"TERMINATED"}, trials[["trial_id", "status"]]
    assert set(trials["stop_reason"]) == {"max_epochs"}, trials["stop_reason"]
    assert set(trials["epochs"]) == {max_epochs}
    assert trials["node_id"].nunique() >= 2, "trials ran on one node only"
    assert trials["node"].nunique() >= 2  # "IP/node id", where each trial ran last
    nodes_used = {n for sp in spans.values() for n, _, _ in sp}
    assert cluster.head_node.node_id not in nodes_used, "a trial ran on the head"
    moved = 0
    epochs_frame = pd.read_parquet(run / "epochs.parquet")
    for tid, rows in sorted(results.items()):
        on_victim = [r["epoch"] for r in rows if r["node_id"] == victim.node_id]
        if not (on_victim and rows[-1]["node_id"] != victim.node_id):
            # never moved: one row per epoch, in order
            assert [r["epoch"] for r in rows] == list(range(1, max_epochs + 1)), tid
            continue
        moved += 1
        after = rows[len(on_victim):]
        assert all(r["node_id"] != victim.node_id for r in after)
        epochs = [r["epoch"] for r in after]
        # Resumed from its last checkpoint, not from epoch 1. Ray Tune registers a
        # checkpoint a moment after the epoch's result; a node lost in between makes the
        # trial redo that one epoch from the checkpoint before it.
        assert max(on_victim) <= epochs[0] <= max(on_victim) + 1 and epochs[0] > 1, \
            (tid, on_victim, epochs)
        assert epochs == list(range(epochs[0], max_epochs + 1)), (tid, on_victim, epochs)
        # the epochs frame keeps one row per epoch, the last one reported
        mine = epochs_frame[epochs_frame["trial_id"] == tid]
        assert list(mine["epoch"]) == list(range(1, max_epochs + 1))
        assert trials.set_index("trial_id").loc[tid, "num_failures"] >= 1
        redo = " (redoing that epoch: lost before its checkpoint was registered)" \
            if epochs[0] == max(on_victim) else ""
        print(f"  trial {tid} moved: lost after epoch {max(on_victim)}, resumed at epoch "
              f"{epochs[0]} on {names[after[0]['node_id']]} from its checkpoint{redo}")
    assert moved >= 1, "the lost worker had no unfinished trial"


# ---- 3. fractional GPUs ---------------------------------------------------------------------


def test_quarter_gpus_pack_four_trials_on_one_gpu(cluster, tmp_path):
    """A worker with one (logical) GPU and a CPU-only worker; trials asking 0.25 GPU all go
    to the GPU worker, four at once. Ray hands each its GPU through CUDA_VISIBLE_DEVICES;
    here there is no CUDA device behind it, so torch.cuda.is_available() is False in the
    trial and it trains on the CPU (on a real GPU the same trial reports cuda)."""
    gpu = _worker(cluster, num_cpus=4, num_gpus=1)
    cpu_only = _worker(cluster, num_cpus=2)
    storage = tmp_path / "storage"
    res = _cae("sweep", SPEC, "--address", cluster.address, "--storage", str(storage),
               "--name", "gpus", "--no-report", *FOUR_TRIALS,
               "--set", "trial.max_epochs=4", "--set", "resources.gpu=0.25",
               "--set", "resources.cpu=1")
    assert res.returncode == 0, _tail(res.stdout + res.stderr)
    run = storage / "gpus"
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    assert set(trials["node_id"]) == {gpu.node_id}, "a GPU trial ran off the GPU node"
    assert cpu_only.node_id not in set(trials["node_id"])
    assert set(trials["device"]) == {"cpu"}  # a logical GPU: no CUDA device behind it
    spans = {}
    for tid, rows in _results(run).items():
        first, last = rows[0], rows[-1]
        start = first["timestamp"] - first["time_total_s"]  # timestamps are whole seconds
        spans[tid] = (start, last["timestamp"])
    latest_start = max(s for s, _ in spans.values())
    earliest_end = min(e for _, e in spans.values())
    print("\ntrial spans (s from the first start): " + ", ".join(
        f"{t} {s - min(a for a, _ in spans.values()):.1f}-"
        f"{e - min(a for a, _ in spans.values()):.1f}" for t, (s, e) in sorted(spans.items())))
    assert latest_start + 1 < earliest_end, f"the four trials did not run at once: {spans}"


# ---- 4. the storage rule --------------------------------------------------------------------


def test_check_shared_storage_without_a_cluster():
    from cae.run import directory as rd
    from cae.sweep import cluster as cc

    for uri in ("s3://bucket/sweeps", "gs://bucket/sweeps", "hdfs://nn/sweeps"):
        cc.check_shared_storage(uri)  # URIs need no Ray at all
    assert rd.is_shared_uri("s3://b/x") and rd.is_shared_uri("gs://b/x")
    assert not rd.is_shared_uri("file:///tmp/x") and rd.is_uri("file:///tmp/x")
    assert not rd.is_uri("runs") and not rd.is_shared_uri("/mnt/nfs/runs")
    assert rd.local_path("file:///tmp/x") == Path("/tmp/x")
    assert cc.mount_fstype(Path("/proc/self")) == "proc"
    node = {"Resources": {"CPU": 4.0, "GPU": 1.0}}
    assert cc._can_host(node, {"CPU": 1, "GPU": 0.25})
    assert not cc._can_host({"Resources": {"CPU": 4.0}}, {"CPU": 1, "GPU": 0.25})
    assert not cc._can_host({"Resources": {}}, {"CPU": 1, "GPU": 0})
    from cae.config.errors import UserError

    assert issubclass(cc.SharedStorageError, UserError)  # the CLI's exit status 2


def _unshare_prefix() -> list[str] | None:
    """A command prefix giving a process its own mount namespace, if this machine allows."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation",
                    "private"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return prefix
    return None


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=180, check=False)


# A worker node in this process (as ray.cluster_utils.Cluster.add_node makes them), so
# that it can be started inside its own mount namespace.
NODE = """
import signal, sys, time
import ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(
    gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0,
    object_store_memory=150 * 1024 * 1024, min_worker_port=0, max_worker_port=0,
    include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("NODE=" + node.node_id, flush=True)

def stop(*_):
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(1)
"""

CHECK = """
import sys, ray
from cae.sweep.cluster import check_shared_storage
from cae.config.errors import UserError
ray.init(address=sys.argv[1], log_to_driver=False)
try:
    check_shared_storage(sys.argv[2], {"CPU": 1, "GPU": 0})
except UserError as exc:
    print("REFUSED", exc)
else:
    print("ACCEPTED")
"""


def test_local_storage_that_a_node_cannot_see_is_refused(cluster, tmp_path):
    """A third node in its own mount namespace, with an empty tmpfs over the storage path:
    `cae sweep` refuses the path with exit status 2 and starts no trial; a path it can see
    (a sibling directory, not covered) passes the same check."""
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("no mount namespaces here (unshare): cannot make a node that does not "
                    "see the storage path")
    _worker(cluster, num_cpus=1)
    storage, shared = tmp_path / "storage", tmp_path / "shared"
    storage.mkdir()
    log = tmp_path / "blind-node.log"
    blind = _spawn(
        [*prefix, "sh", "-c", 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"', "sh",
         str(storage), sys.executable, "-c", NODE, cluster.address],
        log, env=_env(), cwd=ROOT)
    try:
        deadline = time.time() + 90
        blind_id = None
        while blind_id is None:
            assert blind.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the namespaced worker did not join"
            lines = log.read_text().split()
            started = [w.removeprefix("NODE=") for w in lines if w.startswith("NODE=")]
            alive = {n["NodeID"] for n in cluster.global_state.node_table() if n["Alive"]}
            blind_id = started[0] if started and started[0] in alive else None
            time.sleep(0.5)

        res = _cae("sweep", SPEC, "--address", cluster.address, "--storage", str(storage),
                   "--name", "refused", "--no-report", *FOUR_TRIALS)
        assert res.returncode == 2, _tail(res.stdout + res.stderr)
        err = res.stderr
        assert "cannot see" in err and blind_id[:8] in err, err
        assert "s3://" in err and "gs://" in err and "shared" in err, err
        assert "Traceback" not in err
        assert list(storage.iterdir()) == [], "something was written: a trial started?"
        assert not (storage / "refused").exists()
        print("\nrefusal: " + next(ln for ln in err.splitlines() if "cae: error" in ln))

        ok = _python(CHECK, cluster.address, str(shared))
        assert "ACCEPTED" in ok.stdout, ok.stdout + ok.stderr
        assert list(shared.iterdir()) == [], "the marker file was left behind"
    finally:
        _stop_group(blind)


def test_autoscaling_from_zero_needs_shared_storage(cluster, tmp_path):
    """A head alone that cannot run a trial (cluster.yaml's CPU: 0 head before the
    autoscaler adds GPU workers): the nodes that will run the trials cannot be asked, so a
    local path on a local filesystem is refused."""
    res = _python(CHECK, cluster.address, str(tmp_path / "runs" / "sweeps"))
    assert "REFUSED" in res.stdout, res.stdout + res.stderr
    assert "no node of the cluster can run a trial yet" in res.stdout
    assert "s3://" in res.stdout
    assert not (tmp_path / "runs").exists()  # what the check made, it removed


# ---- 5. results on shared storage (a URI) -------------------------------------------------


def test_results_land_in_uri_storage_and_resume_from_it(cluster, tmp_path):
    """--storage as a URI: file:// here, which Ray Tune and cae read through pyarrow's
    filesystems exactly as they read s3:// and gs://. The run directory with the spec,
    trials.parquet, epochs.parquet and the report lands there; `cae resume URI` (what one
    submits as a job to continue a run on the cluster) and `cae export URI` work on it."""
    _worker(cluster, num_cpus=2)
    uri = f"file://{tmp_path}/bucket/sweeps"
    run = tmp_path / "bucket" / "sweeps" / "uri"
    res = _cae("sweep", SPEC, "--address", cluster.address, "--storage", uri, "--name", "uri",
               *FOUR_TRIALS, "--set", "trial.max_epochs=2")
    assert res.returncode == 0, _tail(res.stdout + res.stderr)
    assert f"run directory: {uri}/uri" in res.stdout
    for name in ("spec.yaml", "trials.parquet", "epochs.parquet", "report.html"):
        assert (run / name).is_file(), name
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    (run / "trials.parquet").unlink()

    res = _cae("resume", f"{uri}/uri", "--address", cluster.address, "--no-report")
    assert res.returncode == 0, _tail(res.stdout + res.stderr)
    assert "resuming" in res.stdout
    assert len(pd.read_parquet(run / "trials.parquet")) == 4  # finished trials not rerun
    res = _cae("export", f"{uri}/uri")
    assert res.returncode == 0, _tail(res.stdout + res.stderr)

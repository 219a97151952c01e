"""slurm/sweep.sbatch on a real Slurm, started by this test on this machine.

Debian's slurmctld, slurmd, slurm-client and munge (installed here when missing: the test
runs as root, as CI does), a munged on a socket of its own, a slurmctld and two slurmd with
node names cae-n1 and cae-n2, their own ports, one (fake) GPU each through gres.conf
(a character device standing in for /dev/nvidia0), proctrack/linuxproc, task/none, no
cgroups, no accounting. Both "nodes" are this machine, so they share its address, and the
script's port blocks keep their Ray nodes apart as they keep two jobs apart on one node.

- the README's command, `sbatch --nodes=2 --gres=gpu:1 slurm/sweep.sbatch cae sweep ...`
  on the quickstart at resources.gpu=0.5: every trial finishes, trials ran on both Slurm
  nodes, token authentication was on (a token in the jobs' $HOME), and no Ray process of
  the job outlives it;
- a chain: the same sweep stopped by USR1 to the batch shell (what `--signal=B:USR1@120`
  sends before the time limit) exits 3, a job queued with --dependency=afterany runs
  `cae resume` to the end (exit 0), and a third job resuming the finished run exits 0 at
  once, without starting Ray.
  Every epoch of every trial has the validation loss of the uninterrupted run, and each is
  reported once; an epoch that a trial finished after the stop, before Ray Tune registered
  its checkpoint, is where the next job goes on from.

Overrides, to keep it to a few minutes: 8 trials (convs 1; the quickstart's latent sizes
and channels), 4 epochs each on 1,024 images, and FIFO without patience, so that every
trial runs every epoch in both runs and the two can be compared epoch by epoch.

The daemons are stopped by pid at the end; jobs left in the queue are cancelled first.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from helpers import epochs_reported, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "slurm/sweep.sbatch"
BIN = Path(sys.executable).parent
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("cae-n1", "cae-n2")
# The README's sweep at resources.gpu=0.5, made short (see the module docstring).
SWEEP = ["cae", "sweep", "sweeps/quickstart.yaml", "--set", "resources.gpu=0.5"]
SHORT = ["--no-report", "--set", "space.model.convs=1", "--set", "trial.max_epochs=4",
         "--set", "trial.data.train_limit=1024", "--set", "scheduler.kind=fifo",
         "--set", "trial.patience=null"]
N_TRIALS, N_EPOCHS = 8, 4
JOB_TIMEOUT_S = 420


def test_script_passes_bash_n_and_shellcheck():
    subprocess.run(["bash", "-n", SCRIPT], cwd=ROOT, check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    res = subprocess.run(["shellcheck", SCRIPT], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- SIGTERM to the command itself --------------------------------------------------------------


def test_sigterm_inside_a_fit_goes_to_tunes_stop_handler_once():
    """The first SIGTERM of a fit calls the SIGUSR1 handler installed inside it (Tune's);
    a second one, and any SIGTERM after the fit, reach the handler from before."""
    from cae.sweep.signals import sigterm_stops_tune

    seen = []
    before_term = signal.signal(signal.SIGTERM, lambda s, f: seen.append("previous"))
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        with sigterm_stops_tune():
            signal.signal(signal.SIGUSR1, lambda s, f: seen.append(f"tune {s}"))  # the fit's
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [f"tune {int(signal.SIGUSR1)}"]
            os.kill(os.getpid(), signal.SIGTERM)  # a second one: as before
            assert seen[1:] == ["previous"]
        os.kill(os.getpid(), signal.SIGTERM)  # after the fit: as before
        assert seen[2:] == ["previous"]
        with sigterm_stops_tune():  # Tune's handler of the earlier fit is no fit's now
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen[3:] == ["previous"]
    finally:
        signal.signal(signal.SIGTERM, before_term)
        signal.signal(signal.SIGUSR1, before_usr1)


@pytest.mark.slow
def test_sigterm_stops_a_local_sweep_that_resume_finishes(tmp_path):
    """`cae sweep` (Ray in-process) sent SIGTERM mid-way, as `ray job stop`, `kill` or a
    container stop do: exit status 3, the state saved; `cae resume` runs the rest (exit 0),
    each trial going on from its last registered epoch."""
    cmd = [sys.executable, "-m", "cae.cli", "sweep", "sweeps/quickstart.yaml", "--storage",
           str(tmp_path), "--name", "term", *SHORT,
           "--set", "space.model.latent_dim={grid: [4, 16]}"]  # 4 trials, 1 CPU each
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run = tmp_path / "term"
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while epochs_reported(run) < 3:
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        assert time.time() < deadline, "the sweep made no progress"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 3, (tmp_path / "sweep.log").read_text()[-3000:]
    registered = _registered(run)
    assert 0 < sum(registered.values()) < 4 * N_EPOCHS
    res = subprocess.run([sys.executable, "-m", "cae.cli", "resume", str(run), "--no-report"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    for path in run.glob("*/result.json"):
        assert _reported(path) == list(range(1, N_EPOCHS + 1)), path.parent.name


# ---- a Slurm of our own ---------------------------------------------------------------------


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _install() -> None:
    """Debian's packages, when missing. Their maintainer scripts start the services unless
    a policy-rc.d says no; slurmctld's would fail without a configuration and fail the
    install, so one is in place for the length of the install (if none is)."""
    if all(_which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if _which("apt-get") is None:
        pytest.fail(f"Slurm is not installed and there is no apt-get to install {PACKAGES}")
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:  # a fresh machine: no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                           check=False)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        if made:
            policy.unlink()
    assert res.returncode == 0, f"apt-get install {' '.join(PACKAGES)}:\n{res.stderr[-3000:]}"


@dataclass
class Slurm:
    """munged, slurmctld and two slurmd in ``home``, and how to talk to them."""

    home: Path
    env: dict
    daemons: list[subprocess.Popen] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> str:
        res = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=False)
        if check:
            assert res.returncode == 0, f"{' '.join(cmd)}: {res.stdout}{res.stderr}"
        return res.stdout

    def sbatch(self, *args: str) -> str:
        job = self.run("sbatch", "--parsable", *args).strip().split(";")[0]
        self.jobs.append(job)
        return job

    def state(self, job: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", job)
        return dict(re.findall(r"(\w+)=(\S+)", text))

    def queued(self, job: str) -> bool:
        return bool(self.run("squeue", "-h", "-j", job, "-o", "%T", check=False).strip())

    def wait(self, job: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Until the job has left the queue (its processes ended); its final record."""
        deadline = time.time() + timeout
        while self.queued(job):
            assert time.time() < deadline, f"job {job} still queued after {timeout:.0f} s"
            time.sleep(1)
        return self.state(job)

    def stop(self) -> None:
        if self.jobs:
            self.run("scancel", *self.jobs, check=False)
            deadline = time.time() + 60
            while any(self.queued(j) for j in self.jobs) and time.time() < deadline:
                time.sleep(1)
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.daemons):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for job in self.jobs:  # Ray's logs of each job, which the script leaves for a look
            shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)


SLURM_CONF = """\
ClusterName=caetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={home}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool/%n
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd-%n.pid
SlurmctldLogFile={home}/log/slurmctld.log
SlurmdLogFile={home}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId={first_job}
MinJobAge=3600
KillWait=10
{nodes}
PartitionName=cae Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


def _start(home: Path) -> Slurm:
    """Write the configuration and start munged, slurmctld and the two slurmd."""
    for d in ("state", "log", "dev", *(f"spool/{n}" for n in NODES)):
        (home / d).mkdir(parents=True)
    home.chmod(0o755)  # munged wants its socket's directory searchable by all
    key = home / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    device = home / "dev" / "nvidia0"  # gres/gpu insists on a character device
    try:
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        gres_file = f" File={device}"
    except OSError:
        gres_file = ""  # no device nodes here: SLURM_GPUS_ON_NODE still says 1
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 2
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
        f"CPUs={cpus} RealMemory=2000 Gres=gpu:1 State=UNKNOWN" for n in NODES)
    (home / "slurm.conf").write_text(SLURM_CONF.format(
        host=host, home=home, ctld_port=free_port(), nodes=nodes, node_list=",".join(NODES),
        first_job=random.randint(100_000, 900_000)))
    (home / "gres.conf").write_text("AutoDetect=off\n" + "".join(
        f"NodeName={n} Name=gpu{gres_file}\n" for n in NODES))

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RAY_")) and k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}:/usr/sbin:/sbin"  # cae, ray
    env["SLURM_CONF"] = str(home / "slurm.conf")
    # The jobs' home, as a cluster's shared $HOME, with a Ray token in it: `ray start --head`
    # turns token authentication on by itself then, and the script must use it everywhere.
    job_home = home / "home"
    (job_home / ".ray").mkdir(parents=True)
    (job_home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
    env["HOME"] = str(job_home)
    slurm = Slurm(home, env)

    def spawn(name: str, *cmd: str) -> None:
        with open(home / "log" / f"{name}.out", "w") as out:
            slurm.daemons.append(subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        spawn("munged", _which("munged"), "--foreground", f"--socket={home}/munge.sock",
              f"--key-file={key}", f"--pid-file={home}/munged.pid",
              f"--log-file={home}/log/munged.log", f"--seed-file={home}/munge.seed")
        deadline = time.time() + 30
        while not (home / "munge.sock").exists():
            assert slurm.daemons[0].poll() is None, (home / "log/munged.out").read_text()
            assert time.time() < deadline, "munged did not start"
            time.sleep(0.2)
        spawn("slurmctld", _which("slurmctld"), "-D", "-i", "-f", env["SLURM_CONF"])
        for n in NODES:
            spawn(f"slurmd-{n}", _which("slurmd"), "-D", "-N", n, "-f", env["SLURM_CONF"])
        deadline = time.time() + 90
        while True:
            idle = slurm.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).split("\n")
            if sum(line.endswith(" idle") for line in idle) == len(NODES):
                return slurm
            for proc in slurm.daemons:
                assert proc.poll() is None, _logs(home)
            assert time.time() < deadline, f"nodes not idle: {idle}\n{_logs(home)}"
            time.sleep(0.5)
    except BaseException:
        slurm.stop()
        raise


def _logs(home: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                     for p in sorted((home / "log").glob("*")) if p.is_file())


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("needs root: installs Debian's Slurm packages and runs slurmctld and "
                    "slurmd (which start jobs as any user)")
    _install()
    home = Path(tempfile.mkdtemp(prefix="caeslurm", dir="/tmp"))  # short: munge's socket
    cluster = _start(home)
    yield cluster
    cluster.stop()
    shutil.rmtree(home, ignore_errors=True)


# ---- what a job left ------------------------------------------------------------------------


def _ray_processes(job: str) -> list[str]:
    """Processes of the job's Ray (their command lines name its temp dir, /tmp/ray-JOBID)."""
    import psutil

    marker = re.compile(rf"/tmp/ray-{job}(/|\s|$)")
    found = []
    for proc in psutil.process_iter():
        try:
            line = " ".join(proc.cmdline())
        except (psutil.Error, OSError):
            continue
        if marker.search(line):
            found.append(f"{proc.pid} {line[:120]}")
    return found


def _slurm_node_of(log: str) -> dict[str, str]:
    """Ray node id (8 characters) -> the Slurm node it ran on, from the job's log: each node
    says which block of ports it took, the script lists each Ray node's node-manager port."""
    blocks = [(n, int(a), int(b)) for n, a, b in
              re.findall(r"cae-sweep: (\S+): Ray node on ports (\d+)-(\d+)", log)]
    out = {}
    for node_id, port in re.findall(r"cae-sweep: Ray node (\w{8}) at [\d.]+:(\d+):", log):
        out[node_id] = next(n for n, a, b in blocks if a <= int(port) <= b)
    return out


def _epochs(run: Path) -> pd.DataFrame:
    """(config_id, epoch) -> val_loss and train_loss of a run."""
    trials = pd.read_parquet(run / "trials.parquet")[["trial_id", "config_id"]]
    epochs = pd.read_parquet(run / "epochs.parquet")
    return epochs.merge(trials, on="trial_id").set_index(["config_id", "epoch"]).sort_index()


def _finish(slurm: Slurm, job: str, log: Path) -> tuple[dict, str]:
    state = slurm.wait(job)
    assert not _ray_processes(job), f"Ray processes of job {job} outlived it"
    return state, log.read_text()


# ---- the README's sweep on two nodes ----------------------------------------------------------


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    """The README's two-node sweep, uninterrupted: (run dir, job state, log, wall seconds)."""
    storage = tmp_path_factory.mktemp("shared") / "cae-runs"
    log = storage.parent / "two-nodes.log"
    start = time.time()
    job = slurm.sbatch("--nodes=2", "--gres=gpu:1", f"--output={log}", SCRIPT,
                       *SWEEP, "--storage", str(storage), "--name", "two-nodes", *SHORT)
    state, text = _finish(slurm, job, log)
    return storage / "two-nodes", state, text, time.time() - start


@pytest.mark.slow
def test_sweep_on_two_slurm_nodes(reference):
    run, state, log, wall = reference
    print(f"\ntwo-node sweep: job {state['JobId']} {state['JobState']}, exit "
          f"{state['ExitCode']}, {wall:.0f} s from sbatch to the job's end")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    assert "token authentication on" in log  # the head's token, the workers' too
    assert re.search(r"cae-sweep: 2 Ray nodes, 2 CPUs, 2 GPUs", log), log[-4000:]
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == N_TRIALS and set(trials["status"]) == {"TERMINATED"}, trials
    assert set(trials["epochs"]) == {N_EPOCHS}
    assert set(trials["device"]) == {"cpu"}  # a fake GPU: Ray hands it out, torch sees none
    where = _slurm_node_of(log)
    assert len(where) == 2, log[-4000:]
    on = {where[n[:8]] for n in trials["node_id"]}
    ran = {}
    for path in run.glob("*/result.json"):  # every epoch of every trial, not only the last
        for line in path.read_text().splitlines():
            ran.setdefault(where[json.loads(line)["node_id"][:8]], set()).add(path.parent.name)
    print("trials per Slurm node: " + ", ".join(f"{n}: {len(t)}" for n, t in sorted(ran.items())))
    assert on == set(NODES) and set(ran) == set(NODES), (on, ran)


# ---- a chain of jobs ---------------------------------------------------------------------------


def _reported(result_json: Path) -> list[int]:
    """The epochs a trial reported, each once: an epoch appears twice only when the trial
    went on from a checkpoint Ray Tune had not registered and reported that epoch again
    (``reported_again``: the same metrics, so that the scheduler decides on it)."""
    seen: list[int] = []
    for line in result_json.read_text().splitlines():
        row = json.loads(line)
        if row["epoch"] in seen:
            assert row.get("reported_again"), (result_json.parent.name, row["epoch"])
        else:
            seen.append(row["epoch"])
    return seen


def _registered(run: Path) -> dict[str, int]:
    """trial id -> the last epoch whose checkpoint Ray Tune registered (experiment state)."""
    path = max(run.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    out = {}
    for trial, runtime in json.loads(path.read_text())["trial_data"]:
        trial, runtime = json.loads(trial), json.loads(runtime)
        out[trial["trial_id"]] = int(runtime["last_result"].get("epoch", 0))
    return out


def _on_disk(run: Path) -> dict[str, int]:
    """trial id -> the newest epoch in any checkpoint the trial wrote (history.json)."""
    out = {}
    for params in run.glob("*/params.json"):
        trial_id = params.parent.name.split("_")[2]
        epochs = [max((h["epoch"] for h in json.loads(p.read_text())["epochs"]), default=0)
                  for p in params.parent.glob("checkpoint_*/history.json")]
        out[trial_id] = max(epochs, default=0)
    return out


@pytest.mark.slow
def test_a_chain_of_jobs_resumes_to_the_epochs_of_an_uninterrupted_run(slurm, reference,
                                                                      tmp_path):
    """Job 1 sweeps and is stopped by USR1 (as `--signal=B:USR1@120` sends it) after about a
    third of the work: exit status 3. Job 2, queued with --dependency=afterany, resumes to the
    end: exit status 0. Job 3 (the chain queued longer than needed) exits 0 at once."""
    storage = tmp_path / "cae-runs"
    run = storage / "chain"
    logs = [tmp_path / f"chain-{i}.log" for i in (1, 2, 3)]
    start = time.time()
    first = slurm.sbatch("--nodes=2", "--gres=gpu:1", f"--output={logs[0]}", SCRIPT,
                         *SWEEP, "--storage", str(storage), "--name", "chain", *SHORT)
    # held until job 1 has ended and its run directory was looked at: a job queued with
    # --dependency=afterany starts the moment the one before ends
    second = slurm.sbatch("--hold", f"--dependency=afterany:{first}", "--nodes=2",
                          "--gres=gpu:1", f"--output={logs[1]}", SCRIPT,
                          "cae", "resume", str(run), "--no-report")
    deadline = time.time() + JOB_TIMEOUT_S
    while epochs_reported(run) < N_TRIALS * N_EPOCHS // 3:
        assert slurm.queued(first), logs[0].read_text()[-4000:]
        assert time.time() < deadline, "the sweep made no progress"
        time.sleep(0.5)
    slurm.run("scancel", "--batch", "--signal=USR1", first)
    state1, log1 = _finish(slurm, first, logs[0])
    print(f"\njob 1 (cae sweep, USR1 after {epochs_reported(run)} epoch reports): "
          f"{state1['JobState']}, exit {state1['ExitCode']}, {time.time() - start:.0f} s")
    assert state1["ExitCode"] == "3:0", log1[-4000:]
    assert "did not finish; continue with: cae resume" in log1, log1[-4000:]
    status = subprocess.run([str(BIN / "cae"), "status", str(run)], env=slurm.env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert status.returncode == 0 and "unfinished trials:" in status.stdout, status
    registered, on_disk = _registered(run), _on_disk(run)
    stopped = pd.read_parquet(run / "epochs.parquet")
    assert 0 < len(stopped) < N_TRIALS * N_EPOCHS

    slurm.run("scontrol", "release", second)
    state2, log2 = _finish(slurm, second, logs[1])
    print(f"job 2 (cae resume): {state2['JobState']}, exit {state2['ExitCode']}, "
          f"{time.time() - start:.0f} s since job 1 was submitted")
    assert state2["JobState"] == "COMPLETED" and state2["ExitCode"] == "0:0", log2[-4000:]

    t3 = time.time()
    third = slurm.sbatch(f"--dependency=afterany:{second}", "--nodes=1", f"--output={logs[2]}",
                         SCRIPT, "cae", "resume", str(run), "--no-report")
    state3, log3 = _finish(slurm, third, logs[2])
    print(f"job 3 (cae resume of the finished run): exit {state3['ExitCode']}, "
          f"{time.time() - t3:.0f} s")
    assert state3["ExitCode"] == "0:0", log3
    assert "every trial of the run has finished; nothing to resume" in log3, log3
    assert "Ray" not in log3, log3  # no cluster started for it

    # every epoch once, with the uninterrupted run's losses
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == N_TRIALS and set(trials["status"]) == {"TERMINATED"}
    chain, whole = _epochs(run), _epochs(reference[0])
    assert list(chain.index) == list(whole.index)
    diff = (chain["val_loss"] - whole["val_loss"]).abs().max()
    print(f"per-epoch val_loss, chain vs uninterrupted: {len(chain)} epochs, largest "
          f"difference {diff:.3g}")
    pd.testing.assert_series_equal(chain["val_loss"], whole["val_loss"], rtol=1e-5)
    pd.testing.assert_series_equal(chain["train_loss"], whole["train_loss"], rtol=1e-5)
    # what job 1 trained: its registered epochs are kept as they were; an epoch finished
    # after the stop but not registered (at most one per trial) is where job 2 goes on from
    late = {t: on_disk[t] - registered.get(t, 0) for t in on_disk}
    print(f"job 1: {sum(registered.values())} epochs registered, "
          f"{sum(late.values())} finished after the stop, not registered, gone on from by job 2 "
          f"({', '.join(f'{t}: {n}' for t, n in sorted(late.items()) if n)})")
    assert all(0 <= n <= 1 for n in late.values()), late
    for trial_id, epochs in stopped.groupby("trial_id"):
        kept = chain.loc[trials.set_index("trial_id").loc[trial_id, "config_id"]]
        for row in epochs.itertuples():
            assert kept.loc[row.epoch, "val_loss"] == pytest.approx(row.val_loss, rel=1e-6)
    for path in run.glob("*/result.json"):  # one report per epoch, in order
        assert _reported(path) == list(range(1, N_EPOCHS + 1)), path.parent.name

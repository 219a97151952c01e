"""On one GPU, in at most 6 minutes: trials per hour with one trial per GPU, 8 processes per
GPU, CUDA graphs and fused packs, the GPU's busy share in each, and our data path against a
DataLoader. Writes ``benchmarks/results/gpu.json`` after every case, so a run cut short
still leaves what it measured.

Cases, in the order they run:

a. ``check``: one trial trains on CUDA in bf16 (``precision: auto``), its data and weights
   on the GPU (devices compared as ``torch.device``: "cuda" is "cuda:0" when 0 is current).
b. ``one_per_gpu``: a 32-trial grid of small CAEs (the quickstart's base model on the
   embedded Fashion-MNIST sample, 3 epochs, learning rate x weight decay x seed), one trial
   after another in this process, as with ``resources.gpu: 1``: trials per hour.
e. ``packs``: the grid as fused packs (``cae.train.pack``) of 8, 32 and 64 members (64: the
   grid with twice the seeds), eager and with CUDA graphs.
c. ``eighth_gpu``: the same grid over 8 processes sharing the GPU, as ``resources.gpu:
   0.125`` runs it (without Ray's own start-up, which the sweep adds to both); the processes
   are killed and reaped however the case ends.
f. ``datapath``: Study A's default CAE, batch 32, one epoch over 50,000 32x32x3 images
   (SYNTHETIC uint8: CIFAR-10 cannot be downloaded there; the speed does not depend on the
   pixels): our device-resident data against a DataLoader of PIL images with ToTensor. Both
   sides warm up first (ours: an epoch; the DataLoader: its workers started and their first
   batches through the step) and are timed alike: the loss summed on the device, one
   synchronisation at the end.
d. ``graphs``: (b) with ``compile: reduce-overhead`` (CUDA graphs); compile time apart.

**Time.** ``--budget`` seconds (360) are split between the cases in proportion to their
shares (``CASES``), less ``RESERVE_S`` for writing the results, so the budgets add up to the
total. Each case ends at its planned time from the start (what a case leaves goes to those
after it); it checks that deadline between epochs (of a trial, of a pack) and stops there,
keeping what it finished (``stopped: deadline``, rates from the epochs done). A case whose
minimum no longer fits is skipped with a note. A watchdog ends the run ``GRACE_S`` after the
total (workers killed, results written). ``--dry`` prints the plan and runs nothing.

**Compiles.** Each case records what ``torch.compile`` did (``compile``: graphs compiled,
dynamo's recompiles with their reasons, graph breaks, seconds) and, for trials and packs,
the compiles after their first epoch and per trial. Expected: no graph break, nothing
compiled after the first epoch, nothing for a second trial of the same shapes.

``gpu_busy`` is NVML's utilization.gpu (the share of time a kernel was running, sampled
every 0.1 s; under MIG, where that is not reported, GPM's graphics activity of the GPU
instance; nvidia-smi when pynvml is missing) averaged over a case. The summary:
``trials_per_hour_speedup`` = the best trials per hour of (c), (d), (e) over (b);
``gpu_busy`` of that best case; goals >= 10x, >= 80%, and >= 5x for (f).

    python benchmarks/gpu.py            # on a CUDA GPU, about 6 minutes
    python benchmarks/gpu.py --dry      # the plan: cases, sizes, budgets
    python benchmarks/gpu.py --smoke    # the same cases on the CPU, tiny, about 3 minutes

``--smoke`` writes ``gpu-smoke.json``. It compiles with the real inductor backend (C++
kernels built by gcc against Python's headers; ``--backend aot_eager`` traces only, in
seconds), for a trial and a pack, training and evaluation, so that a graph break or a
recompile shows here first; it proves the script, not speed. What the CPU cannot show, and
the device meets first:

- CUDA graphs. ``reduce-overhead`` records them for CUDA tensors only: on the CPU inductor
  skips them (``cudagraph_skips``). On the device cudagraph trees record a graph per shape
  (full and last batch, training and evaluation), and evaluation runs under
  ``torch.inference_mode`` between training steps (``mark_step`` before each batch); a new
  trial's parameters live at new addresses, so each trial records its graphs again (in
  (d)'s time per trial and the graph pool's memory); a pack records anew per stack width.
  MaskedDropout's step counter is a buffer mutated in the graph; cudagraph trees must keep
  it as a static input or they skip (``cudagraph_skips`` then says so).
- Triton: the kernels, their compile (in parallel on the device's cores), and its launcher,
  built at first use with the C compiler against Python's headers (``toolchain`` records
  both before any case).
- bf16 autocast under compile (``precision: auto`` is fp32 on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

NO_GPU = "gpu.py needs a CUDA GPU (or --smoke to run its cases on the CPU; --dry for the plan)"
BASE_MODEL = {"channels": [4, 8], "bottleneck": "dense", "dense": [64], "latent_dim": 8}
# the smoke run's: the same kinds of layers in one stage, half the kernels to compile
SMOKE_MODEL = {"channels": [4], "bottleneck": "dense", "dense": [32], "latent_dim": 8}
# per case: (seconds it needs to start, its share of the budget), in the order they run
CASES = {"a_check": (10, 25), "b_one_per_gpu": (20, 40), "e_packs": (20, 105),
         "c_eighth_gpu": (30, 60), "f_datapath": (20, 45), "d_graphs": (30, 75)}
ORDER = list(CASES)
BUDGET_S, SMOKE_BUDGET_S = 360, 600
RESERVE_S = 10  # kept back from the cases: writing the results, the summary
GRACE_S = 20  # the watchdog fires this long after the whole budget: with the device call's
# `timeout 400` and the 360 s budget, 20 s before the outer timeout can strike


# ---- sizes and the plan ---------------------------------------------------------------


def sizes(smoke: bool) -> dict:
    """The cases' sizes. Training batches divide the training split and evaluation batches
    the validation and test splits exactly, on the device as in a smoke run, so that each
    pass compiles one graph (a last, smaller batch would compile a second one for every
    trial and pack width): on the device 3,982 of the sample's images, 398 of them held out,
    3,584 = 28 x 128 to train on, 2 x 398 to test."""
    if smoke:
        return {"device": "cpu", "model": SMOKE_MODEL, "train_limit": 300, "test_limit": 30,
                "batch_size": 135, "eval_batch_size": 30, "epochs": 2, "trials": 4,
                "procs": 2, "packs": [2, 4], "graph_packs": [2], "graph_trials": 2,
                "study_images": 1000, "loader_workers": 1, "threads": 1}
    return {"device": "cuda", "model": BASE_MODEL, "train_limit": 3982, "test_limit": 796,
            "batch_size": 128, "eval_batch_size": 398, "epochs": 3, "trials": 32, "procs": 8,
            "packs": [8, 32, 64], "graph_packs": [8, 64], "graph_trials": 32,
            "study_images": 50_000, "loader_workers": 8, "threads": 2}


def plan(total: float, smoke: bool = False, names: list[str] | None = None
         ) -> dict[str, dict]:
    """Each case's ``need``, ``budget`` and planned end (``ends_at``, seconds from the start),
    for ``names`` (all cases by default) in their order: the budgets split
    ``total - RESERVE_S`` by the cases' shares and add up to it exactly. In a smoke run
    every case runs (its need is 1 s): the smoke run proves the script."""
    names = [n for n in ORDER if names is None or n in names]
    usable = max(0.0, total - RESERVE_S)
    shares = sum(CASES[n][1] for n in names)
    out, ends_at = {}, 0.0
    for i, name in enumerate(names):
        need, share = CASES[name]
        budget = usable - ends_at if i == len(names) - 1 else round(usable * share / shares, 1)
        ends_at = round(ends_at + budget, 1)
        out[name] = {"need": 1 if smoke else need, "budget": round(budget, 1),
                     "ends_at": ends_at}
    return out


def grid(n: int, s: dict, **extra) -> list[dict]:
    """``n`` trial dicts: lr x weight decay x seed (4 x 2 x n/8) of one small CAE."""
    out = []
    for i in range(n):
        out.append({
            "data": {"dataset": "sample", "train_limit": s["train_limit"],
                     "test_limit": s["test_limit"]},
            "task": {"name": "reconstruct"}, "model": dict(s["model"]),
            "lr": [0.001, 0.002, 0.003, 0.005][i % 4], "weight_decay": [0.0, 1e-4][i // 4 % 2],
            "seed": i // 8, "batch_size": s["batch_size"],
            "eval_batch_size": s["eval_batch_size"], "max_epochs": s["epochs"],
            "patience": None, "device": s["device"], **extra})
    return out


def print_plan(total: float, smoke: bool, backend: str, names: list[str] | None = None) -> None:
    rows = [(name, p["need"], p["budget"], p["ends_at"])
            for name, p in plan(total, smoke, names).items()]
    rows.append(("(reserve: the results)", "", RESERVE_S, total))
    print(f"gpu.py {'--smoke ' if smoke else ''}plan: {total:.0f} s in all, compile backend "
          f"{backend}, watchdog at {total + GRACE_S:.0f} s")
    print(common.table(rows, ("case", "needs s", "budget s", "ends at s")))
    print("sizes: " + json.dumps(sizes(smoke)))


# ---- deadlines --------------------------------------------------------------------------


class OutOfTime(Exception):
    """A case's deadline passed: raised between two epochs, so what finished is kept."""


class Deadline:
    """When a case must end (``at``, ``time.time()``) and its own budget in seconds."""

    def __init__(self, at: float, budget: float | None = None):
        self.at, self.budget = at, budget

    def left(self) -> float:
        return self.at - time.time()

    def passed(self) -> bool:
        return self.left() <= 0

    def check(self) -> None:
        if self.passed():
            raise OutOfTime


# ---- the GPU's busy share -------------------------------------------------------------------


class Busy:
    """Samples the GPU's busy share (percent of time a kernel ran) in a thread, all run
    long: NVML's utilization.gpu; under MIG, where NVML does not report it, GPM's graphics
    activity of our GPU instance; else nvidia-smi. ``source`` says which (or why none)."""

    def __init__(self, period: float = 0.1):
        self.period, self.samples, self.source = period, [], None
        self._stop = threading.Event()
        self._read = self._nvml() or self._smi()
        if self._read is not None:
            threading.Thread(target=self._run, daemon=True).start()

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
            return None
        try:
            pynvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception as exc:  # noqa: BLE001 - under MIG: not supported
            return self._gpm(pynvml, handle, exc)
        self.source = "nvml"
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _gpm(self, nv, handle, why: Exception):
        """GPM's GRAPHICS_UTIL (the share of time any kernel ran) between two samples of our
        MIG instance (Hopper and later); None, with the reason in ``source``, elsewhere."""
        try:
            if nv.nvmlDeviceGetMigMode(handle)[0] != getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1):
                raise RuntimeError(f"utilization.gpu: {why}")
            instance = nv.nvmlDeviceGetGpuInstanceId(nv.nvmlDeviceGetMigDeviceHandleByIndex(
                handle, 0))
            samples = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
            nv.nvmlGpmMigSampleGet(handle, instance, samples[0])

            def read() -> float:
                nv.nvmlGpmMigSampleGet(handle, instance, samples[1])
                get = nv.c_nvmlGpmMetricsGet_t()
                get.version, get.numMetrics = nv.NVML_GPM_METRICS_GET_VERSION, 1
                get.sample1, get.sample2 = samples
                get.metrics[0].metricId = nv.NVML_GPM_METRIC_GRAPHICS_UTIL
                nv.nvmlGpmMetricsGet(get)
                samples.reverse()  # this sample starts the next interval
                return float(get.metrics[0].value)

            read()
        except Exception as exc:  # noqa: BLE001 - a diagnostic only: say why there is none
            self.source = f"none (NVML: {type(exc).__name__}: {exc})"[:200]
            return None
        self.source, self.period = "nvml-gpm (MIG)", 0.2
        return read

    def _smi(self):
        cmd = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu",
               "--format=csv,noheader,nounits"]
        try:
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=5)
            float(out.stdout.split()[0])  # "[N/A]" under MIG
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
        self.source, self.period = "nvidia-smi", 0.5
        return lambda: float(subprocess.run(cmd, check=False, capture_output=True, text=True,
                                            timeout=5).stdout.split()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            with suppress(Exception):  # a missed sample is only a missed sample
                self.samples.append((time.time(), self._read()))
            self._stop.wait(self.period)

    def between(self, t0: float, t1: float) -> float | None:
        vals = [v for t, v in self.samples if t0 <= t <= t1]
        return round(sum(vals) / len(vals) / 100, 3) if vals else None


# ---- the budget and the results file --------------------------------------------------------


class Run:
    """The results so far, written whole after every case; the plan and the time left."""

    def __init__(self, args, s: dict):
        self.args, self.s = args, s
        self.t0 = time.time()
        self.t_end = self.t0 + args.budget
        self.plan = plan(args.budget, args.smoke, args.cases)
        self.started, self.info = common.now(), common.machine()
        self.info["toolchain"] = toolchain()
        self.info["inductor_cache"] = inductor_cache()
        self.cases: dict = {}
        self._writing = threading.Lock()  # the watchdog and the cases write one at a time
        self.busy = Busy()
        self.out = args.out or common.results_path("gpu", False, "smoke" if args.smoke else None)
        # a case that hangs (a compilation, a driver) must not cost the results so far
        watchdog = threading.Timer(args.budget + GRACE_S, self._overrun)
        watchdog.daemon = True
        watchdog.start()

    def _overrun(self) -> None:
        late = self.args.budget + GRACE_S
        self.cases["watchdog"] = {"status": "error", "error": f"still running {late:.0f} s after "
                                  "the start: stopped; the cases above are what finished"}
        kill_all(list(LIVE))
        with suppress(Exception):
            self.write()
        print("gpu.py: out of time, results written", file=sys.stderr, flush=True)
        os._exit(3)

    @contextmanager
    def case(self, name: str):
        """Run a case if its minimum fits before its planned end; yield its deadline (or
        None) and its result. An error ends the case, not the run; an interruption (SIGTERM,
        ^C) is recorded and written before it goes on up."""
        p = self.plan[name]
        deadline = Deadline(self.t0 + p["ends_at"], p["budget"])
        result: dict = {"budget_s": p["budget"]}
        self.cases[name] = result
        if deadline.left() < p["need"]:
            result.update(status="skipped",
                          note=f"{max(0.0, deadline.left()):.0f} s left, needs {p['need']} s")
            yield None, result
            self.write()
            return
        counts = common.CompileCounts()
        t0 = time.time()
        print(f"{name} ...", flush=True)
        try:
            yield deadline, result
            result.setdefault("status", "partial" if result.get("stopped") else "ok")
        except Exception as exc:  # noqa: BLE001 - one case failing must not lose the rest
            result.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000])
        except BaseException:
            result.update(status="interrupted")
            raise
        finally:
            result["case_s"] = round(time.time() - t0, 2)
            result.setdefault("gpu_busy", self.busy.between(t0, time.time()))
            result["compile"] = counts.now()
            self.write()

    def write(self) -> None:
        with self._writing:
            self._write()

    def _write(self) -> None:
        figures = {"what": __doc__.split("\n\n")[0], "smoke": self.args.smoke,
                   "backend": self.args.backend, "budget_s": self.args.budget,
                   "plan": self.plan, "busy_source": self.busy.source,
                   "sizes": self.s, "cases": self.cases,
                   "wall_s": round(time.time() - self.t0, 1), "cpu_s": cpu_seconds(),
                   **summary(self.cases, judged=not self.args.smoke)}
        common.write_results(self.out, "gpu", self.info, figures, self.started)


def cpu_seconds() -> float:
    """CPU seconds (user and system) of this process and of its children that have ended
    (the workers of (c), inductor's compile workers)."""
    import resource

    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                 resource.RUSAGE_CHILDREN))
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def inductor_cache() -> dict:
    """Where inductor keeps what it compiled and how many files it held at the start (0: a
    cold cache, every graph compiled from scratch)."""
    where = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not where:
        try:
            from torch._inductor.runtime.runtime_utils import cache_dir

            where = cache_dir()
        except Exception:  # noqa: BLE001 - a record, never a failure
            return {"dir": None, "files_at_start": None}
    files = sum(len(f) for _, _, f in os.walk(where)) if os.path.isdir(where) else 0
    return {"dir": where, "files_at_start": files}


def toolchain() -> dict:
    """What inductor needs at its first compile (on the CPU for its C++ kernels, on a GPU for
    Triton's launcher): a C compiler and Python's headers."""
    include = Path(sysconfig.get_paths()["include"])
    return {"cc": shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"),
            "python_h": (include / "Python.h").is_file(), "python_include": str(include)}


def summary(cases: dict, judged: bool = True) -> dict:
    """The best speed-up over (b), its GPU busy share, the goals (not in a smoke run, whose
    figures prove the script, not the speed), and each case's compile counts."""
    base = (cases.get("b_one_per_gpu") or {}).get("trials_per_hour")
    rows = []
    for name in ("c_eighth_gpu", "d_graphs"):
        r = cases.get(name) or {}
        if r.get("trials_per_hour"):
            rows.append((name, r["trials_per_hour"], r.get("gpu_busy")))
    for r in (cases.get("e_packs") or {}).get("packs", []):
        if r.get("trials_per_hour"):
            rows.append((f"e_packs {r['members']} {r['compile']}", r["trials_per_hour"],
                         r.get("gpu_busy")))
    out: dict = {"trials_per_hour_speedup": None, "gpu_busy": None, "best": None}
    if base and rows:
        best = max(rows, key=lambda r: r[1])
        out.update(best=best[0], trials_per_hour_speedup=round(best[1] / base, 2),
                   gpu_busy=best[2])
    data = cases.get("f_datapath") or {}
    out["goals"] = None if not judged else {
        "trials_per_hour_speedup >= 10": _met(out["trials_per_hour_speedup"], 10),
        "gpu_busy >= 0.8": _met(out["gpu_busy"], 0.8),
        "datapath ratio >= 5": _met(data.get("ratio"), 5)}
    out["compile_counts"] = {
        name: {k: r["compile"][k] for k in ("compiles", "recompiles", "graph_breaks")}
        | {"after_first_epoch": r.get("compiles_after_first_epoch")}
        for name, r in cases.items() if (r.get("compile") or {}).get("compiles")}
    return out


def _met(value, goal) -> bool | None:
    return None if value is None else value >= goal


# ---- trials -------------------------------------------------------------------------------


def run_trials(dicts: list[dict], data, deadline: Deadline) -> dict:
    """Trials one after another (each: Trainer, fit, test) until done or the deadline,
    checked before each trial and after each epoch: a trial cut short counts its epochs.
    Compiled, also what each trial compiled and what compiled after the first epoch."""
    from cae.config.trial import TrialConfig
    from cae.train.trainer import Trainer

    compiled = any(d.get("compile", "none") != "none" for d in dicts)
    after_first, per_trial = None, []
    t0, done, epochs, first, stopped = time.time(), 0, 0, None, None

    def on_epoch(_metrics, _state) -> None:
        nonlocal epochs, after_first
        epochs += 1
        if compiled and after_first is None:
            after_first = common.CompileCounts()
        deadline.check()

    for d in dicts:
        if deadline.passed():
            stopped = "deadline"
            break
        mine = common.CompileCounts() if compiled else None
        try:
            trainer = Trainer(TrialConfig.model_validate(d), data)
            trainer.fit(on_epoch)
            trainer.test()
            done += 1
        except OutOfTime:
            stopped = "deadline"
        if compiled:
            per_trial.append(mine.now().get("compiles"))
        first = first or time.time() - t0
        if stopped:
            break
    _sync()
    wall = time.time() - t0
    trials = epochs / dicts[0]["max_epochs"]  # trials' worth of epochs, a partial one too
    out = {"trials": len(dicts), "done": done, "epochs": epochs, "stopped": stopped,
           "wall_s": round(wall, 2), "first_trial_s": round(first or 0, 2),
           "trials_per_hour": round(trials / wall * 3600, 1) if epochs else None}
    if compiled:
        out.update(compiles_per_trial=per_trial, compiles_after_first_epoch=after_first.now().get(
            "compiles") if after_first else None)
    return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def same_device(a, b) -> bool:
    """Whether ``a`` and ``b`` name one device (``torch.device`` equality), an index left out
    read as the current one's: "cuda" is "cuda:0" while device 0 is current."""
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type == b.type and (a.index is None) != (b.index is None):
        current = torch.cuda.current_device() if (
            a.type == "cuda" and torch.cuda.is_available()) else 0
        a = torch.device(a.type, current if a.index is None else a.index)
        b = torch.device(b.type, current if b.index is None else b.index)
    return a == b


def check_passed(device, data_device, weights_device, precision: str,
                 val_loss: list[float]) -> bool:
    """(a)'s verdict: the loss fell, data and weights are on the trial's device, and a CUDA
    trial runs in bf16."""
    ok = (val_loss[-1] < val_loss[0] and same_device(data_device, device)
          and same_device(weights_device, device))
    if str(device).startswith("cuda"):
        ok = ok and precision == "bf16"
    return ok


def case_check(run: Run, data, deadline, result) -> None:
    import torch

    from cae.config.trial import TrialConfig
    from cae.train.trainer import Trainer

    d = grid(1, run.s)[0] | {"max_epochs": 2}
    trainer = Trainer(TrialConfig.model_validate(d), data)
    try:
        trainer.fit(lambda _m, _s: deadline.check())
    except OutOfTime:
        result["stopped"] = "deadline"
    h = trainer.history
    cuda = trainer.device.type == "cuda"
    data_device, weights_device = (trainer.splits.train.device,
                                   next(trainer.model.parameters()).device)
    result.update(
        device=str(trainer.device), precision=trainer.precision,
        data_device=str(data_device), weights_device=str(weights_device),
        val_loss=[round(x["val_loss"], 5) for x in h],
        images_per_s=round(trainer.splits.train.shape[0] / h[-1]["epoch_time_s"], 1),
        peak_memory_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        passed=check_passed(trainer.device, data_device, weights_device, trainer.precision,
                            [x["val_loss"] for x in h]))


# ---- (c) processes sharing the GPU ------------------------------------------------------------

LIVE: set = set()  # worker processes running now: the watchdog kills them too


def kill_all(procs) -> None:
    """Kill every process of ``procs`` still running, then reap them all."""
    for p in procs:
        if p.poll() is None:
            with suppress(OSError):
                p.kill()
    for p in procs:
        with suppress(Exception):
            p.wait(timeout=10)
    LIVE.difference_update(procs)


def run_workers(cmds: list[list[str]], env: dict, wait_until: float,
                procs: list | None = None) -> list[dict]:
    """Start every command, wait for all of them until ``wait_until``, and return each one's
    last line of output as JSON. However this ends (an error, a worker failing or running
    late, an interruption) no worker is left running: all are killed and reaped. ``procs``
    receives the processes (for a test to look at)."""
    procs = [] if procs is None else procs
    logs: list = []
    with tempfile.TemporaryDirectory(prefix="cae-gpu-workers-") as tmp:
        try:
            for i, cmd in enumerate(cmds):
                out, err = (open(Path(tmp) / f"{i}.{k}", "w+") for k in ("out", "err"))
                logs.append((out, err))
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env))
                LIVE.add(procs[-1])
            reports = []
            for p, (out, err) in zip(procs, logs):
                try:
                    p.wait(timeout=max(1.0, wait_until - time.time()))
                except subprocess.TimeoutExpired:
                    raise RuntimeError("a worker was still running after the case's "
                                       "deadline: all killed") from None
                out.seek(0)
                err.seek(0)
                if p.returncode != 0:
                    raise RuntimeError(f"worker failed ({p.returncode}): {err.read()[-1500:]}")
                reports.append(json.loads(out.read().strip().splitlines()[-1]))
            return reports
        finally:
            kill_all(procs)
            for out, err in logs:
                out.close()
                err.close()


def case_eighth(run: Run, deadline: Deadline, result) -> None:
    """``procs`` worker processes, each running its share of the grid one after another."""
    n, procs = run.s["trials"], run.s["procs"]
    dicts = grid(n, run.s)
    env = {**os.environ, "OMP_NUM_THREADS": str(run.s["threads"])}
    t0 = time.time()
    cmds = [[sys.executable, __file__, "--worker", json.dumps({
        "trials": dicts[i::procs], "deadline": deadline.at, "backend": run.args.backend,
        "threads": run.s["threads"]})] for i in range(procs)]
    # a worker stops at the deadline after its epoch (and the test of a finished trial)
    reports = run_workers(cmds, env, deadline.at + 30)
    wall = time.time() - t0
    done, epochs = sum(r["done"] for r in reports), sum(r["epochs"] for r in reports)
    trials = epochs / dicts[0]["max_epochs"]
    span = max(r["t_end"] for r in reports) - min(r["t_ready"] for r in reports)
    result.update(processes=procs, trials=n, done=done, epochs=epochs,
                  stopped="deadline" if any(r["stopped"] for r in reports) else None,
                  wall_s=round(wall, 2), span_s=round(span, 2),
                  startup_s=round(min(r["t_ready"] for r in reports) - t0, 2),
                  trials_per_hour=round(trials / wall * 3600, 1) if epochs else None,
                  trials_per_hour_span=round(trials / span * 3600, 1) if epochs else None)


def worker(spec: str) -> int:
    """One of (c)'s processes: load the data, run its trials, print one JSON line."""
    job = json.loads(spec)
    import torch

    torch.set_num_threads(job["threads"])
    use_backend(job["backend"])
    from cae.config.trial import DataConfig
    from cae.data.datasets import load

    data = load(DataConfig.model_validate(job["trials"][0]["data"]))
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context, before the clock starts
    t_ready = time.time()
    r = run_trials(job["trials"], data, Deadline(job["deadline"]))
    print(json.dumps({"t_ready": t_ready, "t_end": time.time(), "done": r["done"],
                      "epochs": r["epochs"], "stopped": r["stopped"]}))
    return 0


# ---- (d) CUDA graphs, (e) packs ------------------------------------------------------------


def case_graphs(run: Run, data, deadline, result) -> None:
    dicts = grid(run.s["graph_trials"], run.s, compile="reduce-overhead")
    skips = _cudagraph_skips()
    result.update(run_trials(dicts, data, deadline))
    if result["done"] > 1:  # without the first trial, which compiled the graphs
        rest = result["wall_s"] - result["first_trial_s"]
        result["trials_per_hour_after_compile"] = round((result["done"] - 1) / rest * 3600, 1)
    result["cudagraph_skips"] = _cudagraph_skips() - skips


def _cudagraph_skips() -> int:
    """How often inductor ran a graph without CUDA graphs (and why it says so in its log)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return -1


def case_packs(run: Run, data, deadline: Deadline, result) -> None:
    """Packs of each size, eager then with CUDA graphs, each until done or the deadline
    (checked between epochs: a pack cut short counts its members' epochs)."""
    from cae.config.trial import TrialConfig
    from cae.train.pack import Pack

    rows = result["packs"] = []
    for mode, sizes_ in (("none", run.s["packs"]), ("reduce-overhead", run.s["graph_packs"])):
        for k in sizes_:
            row = {"members": k, "compile": mode}
            rows.append(row)
            if deadline.left() < 5:
                row.update(status="skipped", note="the case's budget is spent")
                continue
            cfgs = [TrialConfig.model_validate(d) for d in grid(k, run.s, compile=mode)]
            counts = common.CompileCounts() if mode != "none" else None
            t0, skips = time.time(), _cudagraph_skips()
            epochs: list[float] = []
            after_first = []

            def on_epoch(m, _s, epochs=epochs, after_first=after_first):
                epochs.append(next(iter(m.values()))["epoch_time_s"])
                if counts and not after_first:
                    after_first.append(common.CompileCounts())
                deadline.check()

            try:
                Pack(cfgs, data).fit(on_epoch)
                row["status"] = "ok"
            except OutOfTime:
                row.update(status="partial", stopped="deadline")
            except Exception as exc:  # noqa: BLE001 - report it, go on with the others
                row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000])
                continue
            _sync()
            wall = time.time() - t0
            steady = common.median(epochs[1:]) if len(epochs) > 1 else None
            trials = k * len(epochs) / cfgs[0].max_epochs
            row.update(wall_s=round(wall, 2), epochs=len(epochs),
                       epoch_s=[round(e, 3) for e in epochs],
                       trials_per_hour=round(trials / wall * 3600, 1) if epochs else None,
                       trials_per_hour_steady=round(k * 3600 / (steady * cfgs[0].max_epochs), 1)
                       if steady else None,
                       gpu_busy=run.busy.between(t0, time.time()))
            if mode != "none":
                row.update(compile_counts=counts.now(), cudagraph_skips=_cudagraph_skips() - skips,
                           compiles_after_first_epoch=after_first[0].now().get("compiles")
                           if after_first else None)
            print(f"  pack of {k}, compile {mode}: {wall:.1f} s", flush=True)
    late = [r["compiles_after_first_epoch"] for r in rows
            if isinstance(r.get("compiles_after_first_epoch"), int)]
    if late:
        result["compiles_after_first_epoch"] = sum(late)


# ---- (f) the data path ------------------------------------------------------------------


class RGBImages:
    """uint8 (N, H, W, 3) images served one by one as PIL images through ToTensor, as
    torchvision's CIFAR10 dataset does."""

    def __init__(self, images):
        from torchvision import transforms

        self.images, self.to_tensor = images, transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.to_tensor(Image.fromarray(self.images[i])), 0


def loader_side(step, loader, to_device, sync, warmup: int, limit_s: float
                ) -> tuple[float, int]:
    """The DataLoader's side of (f), timed as ours is: ``warmup`` batches through the step
    first (the workers started, their queues filled, the step's kernels chosen), then
    batches until the loader ends or ``limit_s`` passes, the loss summed on the device and
    one ``sync`` at the end (ours: one per epoch). Seconds and images timed."""
    batches = iter(loader)
    for _ in range(warmup):
        x, _ = next(batches)
        step(to_device(x))
    sync()
    t0, seen, total = time.perf_counter(), 0, 0.0
    for x, _ in batches:
        total = total + step(to_device(x)).detach()
        seen += x.shape[0]
        if time.perf_counter() - t0 > limit_s:
            break
    sync()
    return time.perf_counter() - t0, seen


def case_datapath(run: Run, deadline: Deadline, result) -> None:
    """Each side warmed up, then timed alike; the DataLoader's side stops at its share."""
    import datapath
    import torch

    from cae.config.trial import TrialConfig
    from cae.data.datasets import ImageData
    from cae.train.trainer import Trainer

    n = run.s["study_images"]
    gen = torch.Generator().manual_seed(0)
    n_val = round(n / 9)  # so that the 10% validation split leaves exactly n
    images = torch.randint(0, 256, (n + n_val, 3, 32, 32), dtype=torch.uint8, generator=gen)
    data = ImageData(name="cifar10-shaped SYNTHETIC", train=images, test=images[:100])
    cfg = TrialConfig.model_validate({
        "data": {"dataset": "cifar10"}, "task": {"name": "reconstruct"},
        "model": {"preset": "study_a_default"}, "lr": 0.001, "batch_size": 32,
        "max_epochs": 100, "patience": None, "device": run.s["device"]})
    ours, theirs = Trainer(cfg, data), Trainer(cfg, data)
    assert ours.splits.train.shape[0] == n
    hwc = ours.splits.train.permute(0, 2, 3, 1).cpu().numpy()  # the same images, as HWC
    workers = run.s["loader_workers"]
    loader = torch.utils.data.DataLoader(
        RGBImages(hwc), batch_size=32, shuffle=True, num_workers=workers,
        pin_memory=ours.cuda, persistent_workers=workers > 0)
    share = min(deadline.left(), deadline.budget or deadline.left()) / 2.5
    datapath.ours_epoch(ours)  # warm-up
    ours_s = datapath.ours_epoch(ours)  # one host sync (the epoch's loss), then the device's
    theirs.model.train()
    warmup = max(4, 2 * workers * 2)  # two rounds of every worker's prefetched batches
    theirs_s, seen = loader_side(
        lambda x: datapath._step(theirs, x), loader,
        lambda x: x.to(theirs.device, non_blocking=True), _sync, warmup, share)
    ips_ours, ips_theirs = n / ours_s, seen / theirs_s
    result.update(model="study_a_default", images=n, batch_size=32,
                  precision=ours.precision, loader_workers=workers, loader_warmup=warmup,
                  ours_images_per_s=round(ips_ours, 1),
                  dataloader_images_per_s=round(ips_theirs, 1),
                  dataloader_images_timed=seen, ratio=round(ips_ours / ips_theirs, 2))


# ---- main ---------------------------------------------------------------------------------


def use_backend(backend: str) -> None:
    """Compile with ``backend`` instead of inductor (``aot_eager``: dynamo and AOTAutograd
    trace everything inductor compiles, in seconds, without generating code)."""
    if backend == "inductor":
        return
    import torch

    import cae.train.hardware
    import cae.train.pack
    import cae.train.trainer

    real = cae.train.hardware.compiler

    def compiler(mode):
        wrap = real(mode)  # dynamo's settings, as a real run has them
        if mode == "none":
            return wrap
        return lambda m: torch.compile(m, backend=backend, dynamic=False)

    cae.train.trainer.compiler = cae.train.pack.compiler = compiler


def preflight(out: Path) -> int:
    """Write, line by line as each is known, whether pydantic, torch, torchvision and cae's
    config import, their versions, and the GPU torch sees; 0 when all import."""
    ok = True
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        def line(text: str) -> None:
            f.write(text + "\n")
            f.flush()
            print(text, flush=True)

        line(f"python {sys.version.split()[0]}")
        for mod in ("pydantic", "torch", "torchvision", "cae.config.trial"):
            try:
                module = __import__(mod, fromlist=["_"])
                line(f"{mod} {getattr(module, '__version__', 'imports')}")
            except Exception as exc:  # noqa: BLE001 - what fails is the answer
                ok = False
                line(f"{mod} FAILS: {type(exc).__name__}: {exc}"[:500])
        try:
            import torch

            gpu = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                   else "none (torch sees no CUDA device)")
        except Exception as exc:  # noqa: BLE001
            gpu = f"unknown: {type(exc).__name__}: {exc}"[:500]
        line(f"gpu {gpu}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the cases on the CPU, tiny sizes")
    p.add_argument("--dry", action="store_true", help="print the plan of cases; run nothing")
    p.add_argument("--budget", type=float,
                   help=f"seconds for all cases ({BUDGET_S}; {SMOKE_BUDGET_S} --smoke)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile's backend for the compiled cases (inductor)")
    p.add_argument("--cases", type=lambda v: v.split(","), metavar="a_check,d_graphs,...",
                   help="only these cases (a second try: the budget is split between them)")
    p.add_argument("--out", type=Path)
    p.add_argument("--preflight", type=Path, metavar="FILE",
                   help="only check, in seconds, that what the cases need imports (pydantic, "
                        "torch, torchvision, cae) and which GPU there is; write it to FILE")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preflight:
        return preflight(args.preflight)
    unknown = set(args.cases or []) - set(ORDER)
    if unknown:
        p.error(f"no case {', '.join(sorted(unknown))}; the cases: {', '.join(ORDER)}")
    if args.worker:
        return worker(args.worker)
    args.budget = args.budget or (SMOKE_BUDGET_S if args.smoke else BUDGET_S)
    if args.dry:
        print_plan(args.budget, args.smoke, args.backend, args.cases)
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    # `timeout` sends SIGTERM: end through the cases' handlers (results written, workers
    # killed) instead of dying where we stand
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    s = sizes(args.smoke)
    torch.set_num_threads(s["threads"])
    run = Run(args, s)
    run.write()  # a results file from the start, whatever fails next
    try:
        use_backend(args.backend)
        from cae.config.trial import DataConfig
        from cae.data.datasets import load
    except Exception as exc:  # noqa: BLE001 - carried wheels that do not import, say
        run.cases["import"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        run.write()
        print(f"gpu.py: cae does not import here: {exc}; wrote {run.out}", file=sys.stderr)
        return 2
    data = load(DataConfig.model_validate({"dataset": "sample", "train_limit": s["train_limit"],
                                           "test_limit": s["test_limit"]}))
    cases = {
        "a_check": lambda d, r: case_check(run, data, d, r),
        "b_one_per_gpu": lambda d, r: r.update(run_trials(grid(s["trials"], s), data, d)),
        "e_packs": lambda d, r: case_packs(run, data, d, r),
        "c_eighth_gpu": lambda d, r: case_eighth(run, d, r),
        "f_datapath": lambda d, r: case_datapath(run, d, r),
        "d_graphs": lambda d, r: case_graphs(run, data, d, r),
    }
    try:
        for name in run.plan:
            with run.case(name) as (deadline, result):
                if deadline is not None:
                    cases[name](deadline, result)
            print(f"  {name}: {json.dumps({k: v for k, v in result.items() if k != 'packs'})}",
                  flush=True)
    finally:
        kill_all(list(LIVE))
    print(json.dumps(summary(run.cases, judged=not args.smoke), indent=1))
    print(f"wrote {run.out} ({time.time() - run.t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

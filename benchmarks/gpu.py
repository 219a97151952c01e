"""On one GPU, in at most 7 minutes: trials per hour with one trial per GPU, 8 processes per
GPU, CUDA graphs and fused packs, the GPU's busy share in each, and our data path against a
DataLoader. Writes ``benchmarks/results/gpu.json`` after every case, so a run cut short
still leaves what it measured.

Cases (each with a time budget; one that would start with less left than it needs is
skipped with a note, and one that runs out of its budget reports what it finished):

a. ``check``: one trial trains on CUDA in bf16 (``precision: auto``), its data on the GPU.
b. ``one_per_gpu``: a 32-trial grid of small CAEs (the quickstart's base model on the
   embedded Fashion-MNIST sample, 3 epochs, learning rate x weight decay x seed), one trial
   after another in this process, as with ``resources.gpu: 1``: trials per hour.
c. ``eighth_gpu``: the same grid over 8 processes sharing the GPU, as ``resources.gpu:
   0.125`` runs it (without Ray's own start-up, which the sweep adds to both).
d. ``graphs``: (b) with ``compile: reduce-overhead`` (CUDA graphs); compile time apart.
e. ``packs``: the grid as fused packs (``cae.train.pack``) of 8, 32 and 64 members (64: the grid
   with twice the seeds), eager and with CUDA graphs.
f. ``datapath``: Study A's default CAE, batch 32, one epoch over 50,000 32x32x3 images
   (SYNTHETIC uint8: CIFAR-10 cannot be downloaded there; the speed does not depend on the
   pixels): our device-resident data against a DataLoader of PIL images with ToTensor.

``gpu_busy`` is NVML's utilization.gpu (the share of time a kernel was running, sampled
every 0.1 s; nvidia-smi when pynvml is missing) averaged over a case. The summary:
``trials_per_hour_speedup`` = the best trials per hour of (c), (d), (e) over (b);
``gpu_busy`` of that best case; goals >= 10x, >= 80%, and >= 5x for (f).

    python benchmarks/gpu.py            # on a CUDA GPU, about 7 minutes
    python benchmarks/gpu.py --smoke    # the same cases on the CPU, tiny, < 1 minute

``--smoke`` writes ``gpu-smoke.json``; it compiles with the ``aot_eager`` backend (traced,
not code-generated: inductor needs minutes on two cores), so it proves the script, not
speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

NO_GPU = "gpu.py needs a CUDA GPU (or --smoke to run its cases on the CPU)"
BASE_MODEL = {"channels": [4, 8], "bottleneck": "dense", "dense": [64], "latent_dim": 8}
# seconds per case: (needed to start, budget)
BUDGETS = {"a_check": (10, 30), "b_one_per_gpu": (20, 45), "e_packs": (20, 160),
           "c_eighth_gpu": (30, 75), "f_datapath": (20, 60), "d_graphs": (30, 150)}
ORDER = ["a_check", "b_one_per_gpu", "e_packs", "c_eighth_gpu", "f_datapath", "d_graphs"]


# ---- sizes ------------------------------------------------------------------------------


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"device": "cpu", "train_limit": 300, "epochs": 1, "trials": 4, "procs": 2,
                "packs": [2, 4], "graph_packs": [2], "graph_trials": 2, "study_images": 1000,
                "loader_workers": 0, "threads": 1}
    return {"device": "cuda", "train_limit": None, "epochs": 3, "trials": 32, "procs": 8,
            "packs": [8, 32, 64], "graph_packs": [8, 32, 64], "graph_trials": 32,
            "study_images": 50_000, "loader_workers": 8, "threads": 2}


def grid(n: int, s: dict, **extra) -> list[dict]:
    """``n`` trial dicts: lr x weight decay x seed (4 x 2 x n/8) of one small CAE."""
    out = []
    for i in range(n):
        out.append({
            "data": {"dataset": "sample", "train_limit": s["train_limit"]},
            "task": {"name": "reconstruct"}, "model": dict(BASE_MODEL),
            "lr": [0.001, 0.002, 0.003, 0.005][i % 4], "weight_decay": [0.0, 1e-4][i // 4 % 2],
            "seed": i // 8, "batch_size": 128, "max_epochs": s["epochs"], "patience": None,
            "device": s["device"], **extra})
    return out


# ---- the GPU's busy share -------------------------------------------------------------------


class Busy:
    """Samples utilization.gpu (percent of time a kernel ran) in a thread, all run long."""

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
            pynvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
            return None
        self.source = "nvml"
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _smi(self):
        cmd = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu",
               "--format=csv,noheader,nounits"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
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
    """The results so far, written whole after every case; the time left."""

    def __init__(self, args, s: dict):
        self.args, self.s = args, s
        self.t_end = time.time() + args.budget
        self.started, self.info = common.now(), common.machine()
        self.cases: dict = {}
        self.busy = Busy()
        self.out = args.out or common.results_path("gpu", False, "smoke" if args.smoke else None)
        # a case that hangs (a compilation, a driver) must not cost the results so far
        watchdog = threading.Timer(args.budget + 90, self._overrun)
        watchdog.daemon = True
        watchdog.start()

    def _overrun(self) -> None:
        late = self.args.budget + 90
        self.cases["watchdog"] = {"status": "error", "error": f"still running {late:.0f} s after "
                                  "the start: stopped; the cases above are what finished"}
        with suppress(Exception):
            self.write()
        print("gpu.py: out of time, results written", file=sys.stderr, flush=True)
        os._exit(3)

    def left(self) -> float:
        return self.t_end - time.time()

    @contextmanager
    def case(self, name: str):
        """Run a case if its minimum fits in what is left; yield its deadline (or None)."""
        need, budget = BUDGETS[name]
        if self.args.smoke:  # every case runs: the smoke run proves the script
            need, budget = 1, 120
        result: dict = {}
        self.cases[name] = result
        if self.left() < need:
            result.update(status="skipped", note=f"{self.left():.0f} s left, needs {need} s")
            yield None, result
        else:
            t0 = time.time()
            print(f"{name} ...", flush=True)
            try:
                yield min(t0 + budget, self.t_end), result
                result.setdefault("status", "ok")
            except Exception as exc:  # noqa: BLE001 - one case failing must not lose the rest
                result.update(status="error", error=f"{type(exc).__name__}: {exc}")
            result["case_s"] = round(time.time() - t0, 2)
            result.setdefault("gpu_busy", self.busy.between(t0, time.time()))
        self.write()

    def write(self) -> None:
        figures = {"what": __doc__.split("\n\n")[0], "smoke": self.args.smoke,
                   "budget_s": self.args.budget, "busy_source": self.busy.source,
                   "sizes": self.s, "cases": self.cases,
                   **summary(self.cases, judged=not self.args.smoke)}
        common.write_results(self.out, "gpu", self.info, figures, self.started)


def summary(cases: dict, judged: bool = True) -> dict:
    """The best speed-up over (b), its GPU busy share, and the goals (not in a smoke run,
    whose figures prove the script, not the speed)."""
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
    return out


def _met(value, goal) -> bool | None:
    return None if value is None else value >= goal


# ---- trials -------------------------------------------------------------------------------


def run_trials(dicts: list[dict], data, deadline: float) -> dict:
    """Trials one after another (each: Trainer, fit, test) until done or the deadline."""
    from cae.config.trial import TrialConfig
    from cae.train.trainer import Trainer

    t0, done, first = time.time(), 0, None
    for d in dicts:
        if time.time() > deadline:
            break
        trainer = Trainer(TrialConfig.model_validate(d), data)
        trainer.fit()
        trainer.test()
        done += 1
        first = first or time.time() - t0
    _sync()
    wall = time.time() - t0
    return {"trials": len(dicts), "done": done, "wall_s": round(wall, 2),
            "first_trial_s": round(first or 0, 2),
            "trials_per_hour": round(done / wall * 3600, 1) if done else None}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def case_check(run: Run, data, deadline, result) -> None:
    import torch

    from cae.config.trial import TrialConfig
    from cae.train.trainer import Trainer

    d = grid(1, run.s)[0] | {"max_epochs": 2}
    trainer = Trainer(TrialConfig.model_validate(d), data)
    trainer.fit()
    h = trainer.history
    cuda = trainer.device.type == "cuda"
    result.update(
        device=str(trainer.device), precision=trainer.precision,
        data_device=str(trainer.splits.train.device),
        weights_device=str(next(trainer.model.parameters()).device),
        val_loss=[round(x["val_loss"], 5) for x in h],
        images_per_s=round(trainer.splits.train.shape[0] / h[-1]["epoch_time_s"], 1),
        peak_memory_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None)
    ok = h[-1]["val_loss"] < h[0]["val_loss"] and result["data_device"] == str(trainer.device)
    if cuda:
        ok = ok and trainer.precision == "bf16" and result["data_device"].startswith("cuda")
    result["passed"] = ok


def case_eighth(run: Run, deadline, result) -> None:
    """``procs`` worker processes, each running its share of the grid one after another."""
    n, procs = run.s["trials"], run.s["procs"]
    dicts = grid(n, run.s)
    env = {**os.environ, "OMP_NUM_THREADS": str(run.s["threads"])}
    t0 = time.time()
    workers = [subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps({
            "trials": dicts[i::procs], "deadline": deadline, "smoke": run.args.smoke,
            "threads": run.s["threads"]})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(procs)]
    reports = []
    for w in workers:
        out, err = w.communicate(timeout=max(10, deadline - time.time() + 60))
        if w.returncode != 0:
            raise RuntimeError(f"worker failed ({w.returncode}): {err[-1500:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.time() - t0
    done = sum(r["done"] for r in reports)
    span = max(r["t_end"] for r in reports) - min(r["t_ready"] for r in reports)
    result.update(processes=procs, trials=n, done=done, wall_s=round(wall, 2),
                  span_s=round(span, 2),
                  startup_s=round(min(r["t_ready"] for r in reports) - t0, 2),
                  trials_per_hour=round(done / wall * 3600, 1) if done else None,
                  trials_per_hour_span=round(done / span * 3600, 1) if done else None)


def worker(spec: str) -> int:
    """One of (c)'s processes: load the data, run its trials, print one JSON line."""
    job = json.loads(spec)
    import torch

    torch.set_num_threads(job["threads"])
    from cae.config.trial import DataConfig
    from cae.data.datasets import load

    data = load(DataConfig.model_validate(job["trials"][0]["data"]))
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context, before the clock starts
    t_ready = time.time()
    r = run_trials(job["trials"], data, job["deadline"])
    print(json.dumps({"t_ready": t_ready, "t_end": time.time(), "done": r["done"]}))
    return 0


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


def case_packs(run: Run, data, deadline, result) -> None:
    """Packs of each size, eager then with CUDA graphs, each until done or out of time."""
    from cae.config.trial import TrialConfig
    from cae.train.pack import Pack

    rows = result["packs"] = []
    for mode, sizes_ in (("none", run.s["packs"]), ("reduce-overhead", run.s["graph_packs"])):
        for k in sizes_:
            row = {"members": k, "compile": mode}
            rows.append(row)
            if time.time() > deadline - 5:
                row.update(status="skipped", note="the case's budget is spent")
                continue
            cfgs = [TrialConfig.model_validate(d) for d in grid(k, run.s, compile=mode)]
            t0 = time.time()
            skips = _cudagraph_skips()
            try:
                pack = Pack(cfgs, data)
                epochs: list[float] = []
                pack.fit(lambda m, _s, e=epochs: e.append(next(iter(m.values()))["epoch_time_s"]))
                _sync()
            except Exception as exc:  # noqa: BLE001 - report it, go on with the others
                row.update(status="error", error=f"{type(exc).__name__}: {exc}")
                continue
            wall = time.time() - t0
            steady = common.median(epochs[1:]) if len(epochs) > 1 else None
            row.update(status="ok", wall_s=round(wall, 2), epoch_s=[round(e, 3) for e in epochs],
                       trials_per_hour=round(k / wall * 3600, 1),
                       trials_per_hour_steady=round(k * 3600 / (steady * len(epochs)), 1)
                       if steady else None,
                       gpu_busy=run.busy.between(t0, time.time()),
                       cudagraph_skips=_cudagraph_skips() - skips if mode != "none" else None)
            print(f"  pack of {k}, compile {mode}: {wall:.1f} s", flush=True)


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


def case_datapath(run: Run, deadline, result) -> None:
    """One epoch each after a warm-up, ours first; a side stops at its share of the time."""
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
    loader = torch.utils.data.DataLoader(
        RGBImages(hwc), batch_size=32, shuffle=True, num_workers=run.s["loader_workers"],
        pin_memory=ours.cuda, persistent_workers=run.s["loader_workers"] > 0)
    share = (deadline - time.time()) / 2.5
    ours_s = datapath.ours_epoch(ours)  # warm-up
    ours_s = datapath.ours_epoch(ours)
    theirs.model.train()
    t0, seen = time.time(), 0
    for x, _ in loader:  # the tutorial's loop: .to(device), loss.item() per step
        datapath._step(theirs, x.to(theirs.device, non_blocking=True)).item()
        seen += x.shape[0]
        if time.time() - t0 > share:
            break
    _sync()
    theirs_s = time.time() - t0
    ips_ours, ips_theirs = n / ours_s, seen / theirs_s
    result.update(model="study_a_default", images=n, batch_size=32,
                  precision=ours.precision, loader_workers=run.s["loader_workers"],
                  ours_images_per_s=round(ips_ours, 1),
                  dataloader_images_per_s=round(ips_theirs, 1),
                  dataloader_images_timed=seen, ratio=round(ips_ours / ips_theirs, 2))


# ---- main ---------------------------------------------------------------------------------


def smoke_compile() -> None:
    """On the CPU, compile with aot_eager: dynamo and AOTAutograd trace everything a GPU run
    compiles, in seconds (inductor's C++ code generation takes minutes on two cores)."""
    import torch

    import cae.train.pack
    import cae.train.trainer

    def compiler(mode):
        if mode == "none":
            return lambda m: m
        return lambda m: torch.compile(m, backend="aot_eager", dynamic=False)

    cae.train.trainer.compiler = cae.train.pack.compiler = compiler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the cases on the CPU, tiny sizes")
    p.add_argument("--budget", type=float, help="seconds for all cases (420; 600 --smoke)")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if json.loads(args.worker)["smoke"]:
            smoke_compile()
        return worker(args.worker)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    args.budget = args.budget or (600 if args.smoke else 420)
    s = sizes(args.smoke)
    torch.set_num_threads(s["threads"])
    if args.smoke:
        smoke_compile()
    from cae.config.trial import DataConfig
    from cae.data.datasets import load

    run = Run(args, s)
    data = load(DataConfig.model_validate({"dataset": "sample",
                                           "train_limit": s["train_limit"]}))
    cases = {
        "a_check": lambda d, r: case_check(run, data, d, r),
        "b_one_per_gpu": lambda d, r: r.update(run_trials(grid(s["trials"], s), data, d)),
        "e_packs": lambda d, r: case_packs(run, data, d, r),
        "c_eighth_gpu": lambda d, r: case_eighth(run, d, r),
        "f_datapath": lambda d, r: case_datapath(run, d, r),
        "d_graphs": lambda d, r: case_graphs(run, data, d, r),
    }
    for name in ORDER:
        with run.case(name) as (deadline, result):
            if deadline is not None:
                cases[name](deadline, result)
        print(f"  {name}: {json.dumps({k: v for k, v in result.items() if k != 'packs'})}",
              flush=True)
    print(json.dumps(summary(run.cases, judged=not args.smoke), indent=1))
    print(f"wrote {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

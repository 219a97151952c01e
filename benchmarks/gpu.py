"""On a GPU: Study A's default CAE for one epoch, and trials per hour with packed trials.

Needs a CUDA GPU; without one it says so and exits with status 2, writing nothing.

1. Study A's default CAE (``model: {preset: study_a_default}``, batch 32, Adam 1e-3, MSE, as
   the study trained it) for one epoch over 50,000 32x32x3 images: images/s and the GPU's
   utilisation during the epoch. The images are SYNTHETIC uint8 noise of CIFAR-10's shape
   handed to ``cae.train.Trainer`` as ``cae.data.ImageData`` (CIFAR-10 cannot be downloaded
   offline; the speed of an epoch does not depend on the pixels). A warm-up epoch comes
   first; ``--compile`` adds the same with ``torch.compile``.
2. Packing: the same batch of small 28x28 CAE trials (the quickstart's model family on the
   embedded sample, FIFO, a fixed number of epochs, no early stopping) run by ``cae sweep``
   as a subprocess with ``resources.gpu`` = 1, 0.5, 0.25 and 0.125: trials per hour from the
   wall time of each sweep, and the GPU's busy share, sampled every 0.5 s with
   ``nvidia-smi --query-gpu=utilization.gpu``. Goals: 0.125 GPU per trial gives >= 3x the
   trials per hour of 1 GPU per trial; the GPU busy >= 50% of the wall time (at the best
   packing).

    python benchmarks/gpu.py            # 32 trials x 10 epochs per packing
    python benchmarks/gpu.py --quick    # 8 trials x 3 epochs, a smoke run

Writes ``benchmarks/results/gpu.json`` (``gpu-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

NO_GPU = "gpu.py needs a CUDA GPU; none found (torch.cuda.is_available() is False)"
FRACTIONS = (1.0, 0.5, 0.25, 0.125)


class GpuSampler:
    """Samples ``utilization.gpu`` (percent of time a kernel ran) every ``period`` s."""

    def __init__(self, period: float = 0.5, index: int = 0):
        self.period, self.index = period, index
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: str | None = None

    def _run(self) -> None:
        cmd = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
               "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                     timeout=5).stdout
                self.samples.append((time.time(), float(out.strip().splitlines()[0])))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.period)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float | None = None, end: float | None = None) -> dict:
        """Mean utilisation and the share of samples with the GPU busy, between ``start``
        and ``end`` (``time.time()``) if given."""
        vals = [v for t, v in self.samples
                if (start is None or t >= start) and (end is None or t <= end)]
        return {"samples": len(vals),
                "mean_util_pct": round(sum(vals) / len(vals), 1) if vals else None,
                "busy_samples_pct": round(100 * sum(v > 0 for v in vals) / len(vals), 1)
                if vals else None, "error": self.error}


# ---- 1. Study A's default CAE, one epoch ---------------------------------------------------


def study_a_epoch(n_train: int, compile_: bool) -> dict:
    import torch

    from cae.config import TrialConfig
    from cae.data import ImageData
    from cae.train import Trainer

    gen = torch.Generator().manual_seed(0)
    n_val = round(n_train / 9)  # so the 10% validation split leaves exactly n_train
    data = ImageData(
        name="cifar10-shaped SYNTHETIC",
        train=torch.randint(0, 256, (n_train + n_val, 3, 32, 32), dtype=torch.uint8,
                            generator=gen),
        test=torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=gen))
    cfg = TrialConfig.model_validate({
        "data": {"dataset": "cifar10", "val_fraction": 0.1}, "task": {"name": "reconstruct"},
        "model": {"preset": "study_a_default"}, "lr": 0.001, "batch_size": 32,
        "max_epochs": 100, "patience": None, "device": "cuda", "compile": compile_})
    trainer = Trainer(cfg, data)
    assert trainer.splits.train.shape[0] == n_train, trainer.splits.train.shape
    t0 = time.perf_counter()
    trainer.train_epoch()  # warm-up (and compilation)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    trainer.epoch += 1
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        trainer.train_epoch()
        torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer.evaluate(trainer.val)
        torch.cuda.synchronize()
        eval_s = time.perf_counter() - t1
    return {"compile": compile_, "train_images": n_train, "batch_size": 32,
            "warmup_epoch_s": round(warm, 3), "epoch_s": round(train_s, 3),
            "images_per_s": round(n_train / train_s, 1),
            "val_images": int(trainer.splits.val.shape[0]), "val_s": round(eval_s, 3),
            "gpu": gpu.summary()}


# ---- 2. packing --------------------------------------------------------------------------


def packing_spec(n_trials: int, epochs: int) -> dict:
    """``n_trials`` small 28x28 CAEs (quickstart family; lr doubles the grid past 16)."""
    lat = [4, 8, 16, 32]
    space = {"model.latent_dim": {"grid": lat}, "model.channels": {"grid": [[4, 8], [8, 16]]},
             "model.convs": {"grid": [1, 2]}}
    reps = max(1, n_trials // 16)
    if n_trials < 16:
        space["model.latent_dim"] = {"grid": lat[:max(1, n_trials // 4)]}
    if reps > 1:
        space["lr"] = {"grid": [0.003 * (0.8 ** i) for i in range(reps)]}
    return {"name": "packing", "trial": {
        "data": {"dataset": "sample"}, "task": {"name": "reconstruct"},
        "model": {"channels": [4, 8], "bottleneck": "dense", "dense": [64], "latent_dim": 8},
        "lr": 0.003, "batch_size": 128, "max_epochs": epochs, "patience": None,
        "device": "cuda"}, "space": space, "scheduler": {"kind": "fifo"},
        "resources": {"cpu": 1, "gpu": 1}, "max_failures": 0}


def sweep_span(run_dir: Path) -> tuple[float, float] | None:
    """(first trial start, last result) as ``time.time()``, from Ray Tune's experiment state."""
    states = sorted(run_dir.glob("experiment_state-*.json"))
    if not states:
        return None
    data = json.loads(states[-1].read_text())
    starts, ends = [], []
    for _t, meta in data.get("trial_data", []):
        meta = json.loads(meta) if isinstance(meta, str) else meta
        if meta.get("start_time") and meta.get("last_result_time"):
            starts.append(meta["start_time"])
            ends.append(meta["last_result_time"])
    return (min(starts), max(ends)) if starts else None


def run_packing(spec_path: Path, fraction: float, cpus: float, storage: Path) -> dict:
    import pandas as pd

    name = f"gpu{fraction:g}".replace(".", "_")
    cmd = [*common.cae_command(), "sweep", str(spec_path), "--storage", str(storage),
           "--name", name, "--no-report", "--set", f"resources.gpu={fraction}",
           "--set", f"resources.cpu={cpus}"]
    with GpuSampler() as gpu:
        wall, proc = common.run_timed(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = storage / name
    trials = pd.read_parquet(run_dir / "trials.parquet")
    window = sweep_span(run_dir)
    span = window[1] - window[0] if window else None
    n = len(trials)
    # GPU busy over the trials' span only (not Ray's start-up and the export).
    return {"gpu_per_trial": fraction, "trials": n,
            "terminated": int((trials["status"] == "TERMINATED").sum()),
            "trial_epochs": int(trials["epochs"].sum()), "wall_s": round(wall, 2),
            "span_s": round(span, 2) if span else None,
            "trials_per_hour_wall": round(n / wall * 3600, 1),
            "trials_per_hour_span": round(n / span * 3600, 1) if span else None,
            "gpu": gpu.summary(),
            "gpu_during_trials": gpu.summary(*window) if window else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 trials x 3 epochs; 10,000 images")
    p.add_argument("--trials", type=int, help="trials per packing (default 32, 8 --quick)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default 10, 3 --quick)")
    p.add_argument("--cpus", type=float, default=1, help="resources.cpu per trial")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    p.add_argument("--compile", action="store_true", help="also Study A with torch.compile")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    started, info = common.now(), common.machine()
    n_trials = args.trials or (8 if args.quick else 32)
    epochs = args.epochs or (3 if args.quick else 10)
    fractions = [float(f) for f in args.fractions.split(",")]
    tmp = common.tempdir("gpu")

    print("Study A default, one epoch ...", flush=True)
    n_images = 10_000 if args.quick else 50_000
    study = [study_a_epoch(n_images, False)]
    if args.compile:
        try:
            study.append(study_a_epoch(n_images, True))
        except Exception as exc:  # noqa: BLE001 - report it, go on with the packing
            study.append({"compile": True, "error": f"{type(exc).__name__}: {exc}"})
    torch.cuda.empty_cache()

    import yaml

    spec_path = tmp / "packing.yaml"
    spec_path.write_text(yaml.safe_dump(packing_spec(n_trials, epochs), sort_keys=False))
    packing = []
    for f in fractions:
        print(f"packing: {f:g} GPU per trial ...", flush=True)
        packing.append(run_packing(spec_path, f, args.cpus, tmp / "runs"))
    base = packing[0]
    for row in packing:
        row["speedup_vs_first"] = round(row["trials_per_hour_wall"] / base["trials_per_hour_wall"],
                                        3)
    best = max(packing, key=lambda r: r["trials_per_hour_wall"])
    at_min = next((r for r in packing if r["gpu_per_trial"] == min(fractions)), packing[-1])
    speedup = at_min["speedup_vs_first"]
    busy = at_min["gpu"]["mean_util_pct"]
    figures = {
        "what": "1) Study A default CAE, one epoch on SYNTHETIC cifar10-shaped uint8 data via "
                "cae.train.Trainer; 2) the same batch of small-CAE trials via `cae sweep` "
                "(subprocess) at several resources.gpu",
        "study_a": study,
        "packing_spec": packing_spec(n_trials, epochs), "packing": packing,
        "speedup": speedup, "speedup_goal": ">= 3 (0.125 GPU per trial vs 1)",
        "speedup_met": speedup >= 3, "busy_pct": busy, "busy_goal": ">= 50%",
        "busy_met": (busy or 0) >= 50, "best_fraction": best["gpu_per_trial"],
    }
    out = args.out or common.results_path("gpu", args.quick)
    common.write_results(out, "gpu", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(common.table([(f"Study A default{' (compiled)' if s.get('compile') else ''}",
                         s.get("images_per_s", s.get("error")), s.get("epoch_s", ""),
                         (s.get("gpu") or {}).get("mean_util_pct", "")) for s in study],
                       header=("one epoch, batch 32", "images/s", "epoch s", "GPU util %")))
    print()
    print(common.table([(f"{r['gpu_per_trial']:g}", r["trials"], r["wall_s"],
                         r["trials_per_hour_wall"], r["speedup_vs_first"],
                         r["gpu"]["mean_util_pct"],
                         (r["gpu_during_trials"] or {}).get("mean_util_pct", ""))
                        for r in packing],
                       header=("GPU/trial", "trials", "wall s", "trials/h", "x vs 1 GPU",
                               "GPU util % (wall)", "(trials' span)")))
    print(f"\n{n_trials} trials x {epochs} epochs per packing; goals: x{speedup:.2f} at "
          f"{min(fractions):g} GPU ({'met' if speedup >= 3 else 'NOT met'}, >= 3); GPU busy "
          f"{busy}% ({'met' if (busy or 0) >= 50 else 'NOT met'}, >= 50%)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a learning-rate schedule close the gap to PCA in the same epochs?

The quickstart's architectures (channels [4, 8] or [8, 16], 1 or 2 convs per stage, a dense
bottleneck) at each latent size (4, 8, 16, 32), trained for the same number of epochs with
a ``constant``, ``cosine`` and ``onecycle`` schedule (Adam, the quickstart's rate), each
with ``--seeds`` repeats, every trial to its last epoch (no patience, no early stopping):
one ``cae sweep`` of FIFO trials on the embedded Fashion-MNIST sample.

For each latent size and schedule, the best architecture (lowest mean final validation
loss over the seeds) is compared with PCA at the same latent size (the run's own
``baselines.parquet``, on the same validation split): the epoch at which each seed first
reaches PCA's error ("-" when it does not), the final validation loss (mean and spread
over seeds) and its ratio to PCA's. Loss values do not depend on the machine's load; the
wall time does, and is reported only as a record.

    python benchmarks/recipe.py                 # 12 epochs, 2 seeds: 96 trials
    python benchmarks/recipe.py --quick         # 3 epochs, 1 seed, latent 4 and 32
    python benchmarks/recipe.py --latents 4 32 --channels 8,16   # a part of the grid

Writes ``benchmarks/results/recipe.json`` (``recipe-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

SCHEDULES = ["constant", "cosine", "onecycle"]


def spec(epochs: int, seeds: int, latents: list[int], channels: list[list[int]]) -> dict:
    return {
        "name": "recipe",
        "trial": {"data": {"dataset": "sample"}, "task": {"name": "reconstruct"},
                  "model": {"channels": [4, 8], "bottleneck": "dense", "dense": [64],
                            "latent_dim": 8},
                  "lr": 0.003, "batch_size": 128, "max_epochs": epochs, "patience": None},
        "space": {"model.latent_dim": {"grid": latents},
                  "model.channels": {"grid": channels},
                  "model.convs": {"grid": [1, 2]},
                  "schedule.name": {"grid": SCHEDULES}},
        "num_samples": seeds,
        "scheduler": {"kind": "fifo"},
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 1,
        "seed": 0,
    }


def first_epoch_at(curve: list[float], target: float) -> int | None:
    """The first epoch (from 1) whose validation loss is at or below ``target``."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def summarize(trials, epochs, baselines) -> list[dict]:
    """Per latent size and schedule: the best architecture against PCA (see the doc)."""
    pca = baselines[(baselines["baseline"] == "pca") & (baselines["split"] == "val")]
    pca = dict(zip(pca["latent_size"].astype(int), pca["loss"]))
    curves = {tid: g.sort_values("epoch")["val_loss"].tolist()
              for tid, g in epochs.groupby("trial_id")}
    trials = trials.assign(final=[curves[t][-1] for t in trials["trial_id"]])
    rows = []
    for (latent, schedule), group in trials.groupby(["latent_size", "schedule.name"]):
        arch = group.groupby(["model.channels", "model.convs"])["final"].mean().idxmin()
        best = group[(group["model.channels"] == arch[0]) & (group["model.convs"] == arch[1])]
        finals = best["final"].tolist()
        target = pca[int(latent)]
        reached = [first_epoch_at(curves[t], target) for t in best["trial_id"]]
        rows.append({
            "latent": int(latent), "schedule": schedule,
            "architecture": f"channels {arch[0]}, convs {arch[1]}",
            "pca_val": target, "final_val_mean": statistics.fmean(finals),
            "final_val_spread": max(finals) - min(finals),
            "ratio_to_pca": statistics.fmean(finals) / target,
            "epochs_to_pca": reached,
            "seeds_reaching_pca": sum(r is not None for r in reached), "seeds": len(reached),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 epochs, 1 seed, latent 4 and 32")
    p.add_argument("--epochs", type=int, help="epochs per trial (default 12, as the quickstart)")
    p.add_argument("--seeds", type=int, help="repeats per configuration (default 2)")
    p.add_argument("--latents", type=int, nargs="+", help="latent sizes (default 4 8 16 32)")
    p.add_argument("--channels", nargs="+", metavar="C1,C2",
                   help="encoder channels per architecture (default 4,8 8,16)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()
    epochs = args.epochs or (3 if args.quick else 12)
    seeds = args.seeds or (1 if args.quick else 2)
    latents = args.latents or ([4, 32] if args.quick else [4, 8, 16, 32])
    channels = [[int(c) for c in s.split(",")] for s in (args.channels or ["4,8", "8,16"])]
    import pandas as pd

    tmp = common.tempdir("recipe")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec(epochs, seeds, latents, channels)))
    trials, wall = common.sweep_in_process(
        ["sweep", str(path), "--storage", str(tmp), "--name", "run", "--no-report",
         "--report-every", "0"], tmp, "run")
    run = tmp / "run"
    epochs_df = pd.read_parquet(run / "epochs.parquet")
    rows = summarize(trials, epochs_df, pd.read_parquet(run / "baselines.parquet"))
    print(common.table(
        [(r["latent"], r["schedule"], r["architecture"], f"{r['pca_val']:.4f}",
          f"{r['final_val_mean']:.4f} ± {r['final_val_spread'] / 2:.4f}",
          f"{r['ratio_to_pca']:.2f}",
          " ".join("-" if e is None else str(e) for e in r["epochs_to_pca"])) for r in rows],
        ("latent", "schedule", "best architecture", "PCA val", "final val (±half range)",
         "/PCA", "epoch reaching PCA, per seed")))
    figures = {"epochs": epochs, "seeds": seeds, "latents": latents, "channels": channels,
               "schedules": SCHEDULES,
               "trials": len(trials), "sweep_wall_s": round(wall, 1), "rows": rows,
               "all_trials_finished": bool((trials["status"] == "TERMINATED").all()),
               "nan_free": bool(all(math.isfinite(r["final_val_mean"]) for r in rows))}
    out = args.out or common.results_path("recipe", args.quick)
    print(f"results: {common.write_results(out, 'recipe', info, figures, started)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

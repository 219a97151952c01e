"""Model-based search against random search at the same budget: does TPE find better models?

One sweep spec (``SPEC`` below: a small CAE on the embedded sample, four random axes: the
learning rate, weight decay, dropout and the latent size as a choice), run through
``cae.cli.main`` with ``search.kind`` ``grid`` (no grid axes: ``num_samples`` independent
random draws) and ``optuna`` (Optuna's TPE proposing each trial from the ones finished),
each under three seeds, ASHA stopping the weak trials in both. Per run: the best
``best_val_loss`` found, and the trials needed to get within 2% of that run's final best
(trials in the order the search proposed them, from the trial index in their directory
names). Figures per method: the median best over the seeds, the median trials-to-2%.

Goal: TPE's median best is below random search's.

    python benchmarks/search.py            # 40 trials per run
    python benchmarks/search.py --quick    # 12 trials per run, a smoke run

Writes ``benchmarks/results/search.json`` (``search-quick.json``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

SPEC = {
    "name": "search-bench",
    "trial": {"data": {"dataset": "sample", "train_limit": 1500},
              "task": {"name": "reconstruct"},
              "model": {"channels": [8, 16], "bottleneck": "dense", "dense": [64],
                        "latent_dim": 8},
              "batch_size": 128, "max_epochs": 6, "patience": 3},
    "space": {"lr": {"loguniform": [0.0001, 0.05]},
              "weight_decay": {"loguniform": [1.0e-6, 0.03]},
              "model.dropout": {"uniform": [0.0, 0.5]},
              "model.latent_dim": {"choice": [4, 8, 16, 32]}},
    "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 3},
    "resources": {"cpu": 1, "gpu": 0},
    "max_failures": 0,
}
METHODS = {"random": "grid", "tpe": "optuna"}
SEEDS = (0, 1, 2)
WITHIN = 0.02


def trials_to_within(trials, within: float = WITHIN) -> int:
    """Trials (in the order proposed) until the running best is within ``within`` of the
    run's final best."""
    index = trials["trial_dir"].map(lambda d: int(re.match(r"run_trial_[^_]+_(\d+)_", d)[1]))
    ordered = trials.assign(index=index).sort_values("index")
    final = ordered["best_val_loss"].min()
    running = ordered["best_val_loss"].cummin().reset_index(drop=True)
    return int((running <= final * (1 + within)).idxmax()) + 1


def run(spec_path: Path, kind: str, seed: int, n: int, storage: Path) -> dict:
    name = f"{kind}-{seed}"
    argv = ["sweep", str(spec_path), "--storage", str(storage), "--name", name, "--no-report",
            "--report-every", "0", "--set", f"search.kind={kind}", "--set", f"seed={seed}",
            "--set", f"num_samples={n}"]
    trials, wall = common.sweep_in_process(argv, storage, name)
    best = trials.loc[trials["best_val_loss"].idxmin()]
    return {"kind": kind, "seed": seed, "trials": len(trials), "wall_s": round(wall, 1),
            "best_val_loss": float(best["best_val_loss"]),
            "best_config": {k: best[k].item() if hasattr(best[k], "item") else best[k]
                            for k in SPEC["space"]},
            "trials_to_within_2pct": trials_to_within(trials),
            "trial_epochs": int(trials["epochs"].sum()),
            "errors": int((trials["status"] == "ERROR").sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="12 trials per run instead of 40")
    p.add_argument("--trials", type=int, help="trials per run (default 40, --quick 12)")
    args = p.parse_args(argv)
    n = args.trials or (12 if args.quick else 40)
    started, info = common.now(), common.machine()

    from cae.sweep import tuner

    tmp = common.tempdir("search")
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    runs = []
    tuner.init_ray(None)
    try:
        for seed in SEEDS:
            for method, kind in METHODS.items():
                print(f"{method}, seed {seed} ...", flush=True)
                runs.append({"method": method, **run(spec_path, kind, seed, n, tmp)})
    finally:
        import ray

        ray.shutdown()

    summary = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {
            "median_best_val_loss": common.median([r["best_val_loss"] for r in mine]),
            "best_val_loss_each": [r["best_val_loss"] for r in mine],
            "median_trials_to_within_2pct": common.median(
                [float(r["trials_to_within_2pct"]) for r in mine]),
            "trials_to_within_2pct_each": [r["trials_to_within_2pct"] for r in mine],
            "trial_epochs_each": [r["trial_epochs"] for r in mine],
        }
    tpe, rnd = summary["tpe"], summary["random"]
    wins = sum(t["best_val_loss"] < r["best_val_loss"] for t, r in zip(
        [r for r in runs if r["method"] == "tpe"], [r for r in runs if r["method"] == "random"]))
    figures = {
        "what": "one spec (4 random axes: lr, weight_decay, model.dropout, model.latent_dim as "
                "a choice) via cae.cli.main, search.kind grid (random draws) vs optuna (TPE), "
                f"{n} trials per run, ASHA, seeds {list(SEEDS)}",
        "spec": SPEC, "trials_per_run": n, "runs": runs, "summary": summary,
        "tpe_wins_by_seed": f"{wins} of {len(SEEDS)}",
        "tpe_vs_random_median_best": round(tpe["median_best_val_loss"]
                                           / rnd["median_best_val_loss"] - 1, 4),
        "goal": "tpe median_best_val_loss < random median_best_val_loss",
        "met": tpe["median_best_val_loss"] < rnd["median_best_val_loss"],
    }
    out = common.results_path("search", args.quick)
    common.write_results(out, "search", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)

    rows = [(r["method"], r["seed"], r["best_val_loss"], r["trials_to_within_2pct"],
             r["trial_epochs"], r["wall_s"]) for r in runs]
    print()
    print(common.table(rows, header=("method", "seed", "best val", "trials to 2%",
                                     "trial-epochs", "wall s")))
    print()
    print(common.table([(m, s["median_best_val_loss"], s["median_trials_to_within_2pct"])
                        for m, s in summary.items()],
                       header=("method", "median best val", "median trials to 2%")))
    print(f"TPE vs random, median best: {figures['tpe_vs_random_median_best']:+.2%}; TPE "
          f"better in {wins} of {len(SEEDS)} seeds; goal met: {figures['met']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Early stopping against FIFO on the quickstart: per latent size, is the answer the same?

Runs ``sweeps/quickstart.yaml`` (16 CAEs on the embedded sample, 4 latent sizes) through
``cae.cli.main`` with FIFO (every trial to max_epochs or its patience stop) and with three
early-stopping schedulers, each under three trial orders (``--set seed=0/1/2``: the order
the trials start in is shuffled with the spec's seed):

- ``asha``: Ray Tune's ASHA over all trials (no strata);
- ``asha-strata``: ASHA separately per latent size (``scheduler.stratify``);
- ``sha-strata``: synchronous successive halving per latent size (a rung is decided once
  every trial of the stratum has reached it).

Per run: trial-epochs (sum of ``epochs`` in trials.parquet), and at each latent size the
best ``best_val_loss`` and the configuration that reached it (the stratum's winner).
Figures per scheduler: ``epoch_fraction`` (mean trial-epochs / FIFO's), ``per_stratum_gap``
(the largest, over latent sizes and orders, of best / FIFO's best at that size - 1), and
``order_stable`` (the winner at every latent size is the same under the three orders).
FIFO runs once: its trials do not influence each other, and on the CPU a trial's losses do
not depend on when it runs.

Goals (the stratified scheduler shipped as the default): per_stratum_gap <= 0.03,
epoch_fraction <= 0.40, order_stable.

    python benchmarks/asha.py            # the real quickstart
    python benchmarks/asha.py --quick    # with trial.data.train_limit=600, a smoke run

Writes ``benchmarks/results/asha.json`` (``asha-quick.json``); the figures of the landed
grid-order ASHA before stratification are in ``asha-grid-order*.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

SPEC = common.ROOT / "sweeps" / "quickstart.yaml"
SCHEDULERS = {
    "asha": ["scheduler.kind=asha", "scheduler.stratify=[]"],
    "asha-strata": ["scheduler.kind=asha", "scheduler.stratify=[model.latent_dim]"],
    "sha-strata": ["scheduler.kind=sha", "scheduler.stratify=[model.latent_dim]"],
}
ORDERS = (0, 1, 2)
AXES = ("model.channels", "model.convs")


def run(sets: list[str], storage: Path, name: str) -> dict:
    argv = ["sweep", str(SPEC), "--storage", str(storage), "--name", name, "--no-report"]
    for s in sets:
        argv += ["--set", s]
    trials, wall = common.sweep_in_process(argv, storage, name)
    per_latent = {}
    for latent, group in trials.groupby("model.latent_dim"):
        best = group.loc[group["best_val_loss"].idxmin()]
        per_latent[int(latent)] = {
            "best_val_loss": float(best["best_val_loss"]),
            "winner": ", ".join(f"{a}={best[a]}" for a in AXES),
            "winner_epochs": int(best["epochs"]),
            "epochs": sorted(int(e) for e in group["epochs"]),
        }
    return {"name": name, "sets": sets, "wall_s": round(wall, 2),
            "trial_epochs": int(trials["epochs"].sum()), "per_latent": per_latent,
            "stop_reasons": {str(k): int(v) for k, v in
                             trials["stop_reason"].value_counts().items()}}


def summarize(fifo: dict, runs: list[dict]) -> dict:
    fractions = [r["trial_epochs"] / fifo["trial_epochs"] for r in runs]
    gaps = {lat: [r["per_latent"][lat]["best_val_loss"] / f["best_val_loss"] - 1 for r in runs]
            for lat, f in fifo["per_latent"].items()}
    winners = {lat: sorted({r["per_latent"][lat]["winner"] for r in runs})
               for lat in fifo["per_latent"]}
    return {
        "trial_epochs": [r["trial_epochs"] for r in runs],
        "epoch_fraction": round(sum(fractions) / len(fractions), 4),
        "epoch_fraction_each": [round(f, 4) for f in fractions],
        "per_stratum_gap": round(max(max(g) for g in gaps.values()), 5),
        "gap_by_latent": {lat: [round(x, 5) for x in g] for lat, g in gaps.items()},
        "order_stable": all(len(w) == 1 for w in winners.values()),
        "winners_by_latent": winners,
        "winner_trained_to_max_epochs": all(
            r["per_latent"][lat]["winner_epochs"] == max(fifo["per_latent"][lat]["epochs"])
            for r in runs for lat in fifo["per_latent"]),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="--set trial.data.train_limit=600")
    p.add_argument("--only", choices=list(SCHEDULERS), action="append",
                   help="run only these schedulers (and FIFO)")
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()
    sets = ["trial.data.train_limit=600"] if args.quick else []

    from cae.sweep import tuner

    tmp = common.tempdir("asha")
    results = {}
    tuner.init_ray(None)
    try:
        print("FIFO ...", flush=True)
        fifo = run(sets + ["scheduler.kind=fifo"], tmp, "fifo")
        for kind in args.only or SCHEDULERS:
            runs = []
            for seed in ORDERS:
                print(f"{kind}, order {seed} ...", flush=True)
                runs.append(run(sets + SCHEDULERS[kind] + [f"seed={seed}"], tmp,
                                f"{kind}-{seed}"))
            results[kind] = summarize(fifo, runs)
    finally:
        import ray

        ray.shutdown()

    goal = {"per_stratum_gap": 0.03, "epoch_fraction": 0.40, "order_stable": True}
    figures = {
        "what": "sweeps/quickstart.yaml via cae.cli.main: FIFO once, each scheduler under "
                "orders (seeds) 0, 1, 2; per latent size the best best_val_loss and its config",
        "sets": sets, "fifo": fifo, "schedulers": results, "goal": goal,
        "met": {k: (r["per_stratum_gap"] <= goal["per_stratum_gap"]
                    and r["epoch_fraction"] <= goal["epoch_fraction"] and r["order_stable"])
                for k, r in results.items()},
    }
    out = common.results_path("asha", args.quick)
    common.write_results(out, "asha", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)

    rows = [("fifo", fifo["trial_epochs"], "1.000", "", "", "")]
    for kind, r in results.items():
        rows.append((kind, "/".join(map(str, r["trial_epochs"])), f"{r['epoch_fraction']:.3f}",
                     f"{r['per_stratum_gap']:+.2%}", "yes" if r["order_stable"] else "no",
                     "yes" if figures["met"][kind] else "no"))
    print()
    print(common.table(rows, header=("scheduler", "trial-epochs", "fraction",
                                     "worst gap", "order-stable", "goals met")))
    for kind, r in results.items():
        print(f"{kind}: gap by latent {json.dumps(r['gap_by_latent'])}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

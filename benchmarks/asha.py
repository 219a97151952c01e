"""ASHA against FIFO on the quickstart: trial-epochs spent and the best validation loss found.

Runs ``sweeps/quickstart.yaml`` (16 CAEs on the embedded sample) through ``cae.cli.main``
once with ``--set scheduler.kind=fifo`` (every trial to max_epochs, or to its patience
stop, which the quickstart also has) and ``--repeats`` times with its own ASHA scheduler,
then reads each run's ``trials.parquet``: trial-epochs = the sum of ``epochs``; best = the
lowest ``best_val_loss``. ASHA's outcome depends on the order in which trials reach a rung
(two run at a time on two cores), so repeated ASHA runs can differ.

``epoch_fraction`` = ASHA's trial-epochs / FIFO's (goal <= 0.35); ``best_gap`` = ASHA's
best / FIFO's best - 1 (goal <= 0.02). Figures of the repeats are their means; each run's
are in ``runs``.

    python benchmarks/asha.py            # the real quickstart
    python benchmarks/asha.py --quick    # with trial.data.train_limit=600, a smoke run
    python benchmarks/asha.py --set trial.max_epochs=12 --tag e12   # an alternative spec

Writes ``benchmarks/results/asha.json`` (``asha[-TAG][-quick].json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

SPEC = common.ROOT / "sweeps" / "quickstart.yaml"


def run(spec: Path, sets: list[str], storage: Path, name: str, log: Path) -> dict:
    import pandas as pd

    from cae import cli

    argv = ["sweep", str(spec), "--storage", str(storage), "--name", name, "--no-report"]
    for s in sets:
        argv += ["--set", s]
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    wall = time.perf_counter() - t0
    log.write_text(buf.getvalue())
    if rc != 0:
        raise SystemExit(f"sweep {name} failed (exit {rc}); see {log}")
    trials = pd.read_parquet(storage / name / "trials.parquet")
    best = trials.loc[trials["best_val_loss"].idxmin()]
    return {
        "name": name, "sets": sets, "wall_s": round(wall, 2), "trials": len(trials),
        "trial_epochs": int(trials["epochs"].sum()),
        "best_val_loss": float(best["best_val_loss"]), "best_trial": best["trial_id"],
        "best_config": {k: best[k] for k in ("model.latent_dim", "model.channels",
                                             "model.convs") if k in best},
        "epochs_per_trial": sorted(int(e) for e in trials["epochs"]),
        # In trial-id order, which is the order Ray Tune starts them in.
        "epochs_by_trial": {str(t): int(e) for t, e in
                            sorted(zip(trials["trial_id"], trials["epochs"]))},
        "stop_reasons": {str(k): int(v) for k, v in trials["stop_reason"].value_counts().items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="--set trial.data.train_limit=600")
    p.add_argument("--repeats", type=int, help="ASHA runs (default 3, 1 with --quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra overrides for both runs (an alternative spec)")
    p.add_argument("--tag", help="results file suffix for an alternative spec")
    p.add_argument("--spec", type=Path, default=SPEC)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()
    repeats = args.repeats or (1 if args.quick else 3)
    sets = list(args.set) + (["trial.data.train_limit=600"] if args.quick else [])

    from cae import sweep

    tmp = common.tempdir("asha")
    sweep.init_ray(None)
    try:
        print("FIFO ...", flush=True)
        fifo = run(args.spec, sets + ["scheduler.kind=fifo"], tmp, "fifo", tmp / "fifo.log")
        ashas = []
        for i in range(repeats):
            print(f"ASHA {i + 1}/{repeats} ...", flush=True)
            ashas.append(run(args.spec, sets + ["scheduler.kind=asha"], tmp, f"asha{i}",
                             tmp / f"asha{i}.log"))
    finally:
        import ray

        ray.shutdown()

    import yaml

    from cae.config import load_spec

    spec = load_spec(str(args.spec), sets)
    fractions = [a["trial_epochs"] / fifo["trial_epochs"] for a in ashas]
    gaps = [a["best_val_loss"] / fifo["best_val_loss"] - 1 for a in ashas]
    fraction, gap = sum(fractions) / len(fractions), sum(gaps) / len(gaps)
    met = fraction <= 0.35 and gap <= 0.02
    figures = {
        "what": f"{args.spec.name} run with FIFO once and ASHA {repeats}x via cae.cli.main; "
                "trial-epochs = sum of trials.parquet 'epochs', best = min 'best_val_loss'",
        "spec": args.spec.name, "sets": sets,
        "scheduler": spec.scheduler.model_dump(), "max_epochs": spec.trial.get("max_epochs"),
        "patience": spec.trial.get("patience"), "resources": spec.resources.model_dump(),
        "fifo_trial_epochs": fifo["trial_epochs"], "fifo_best_val_loss": fifo["best_val_loss"],
        "asha_trial_epochs": [a["trial_epochs"] for a in ashas],
        "asha_best_val_loss": [a["best_val_loss"] for a in ashas],
        "epoch_fraction": round(fraction, 4), "epoch_fraction_each": [round(f, 4) for f in
                                                                       fractions],
        "best_gap": round(gap, 5), "best_gap_each": [round(g, 5) for g in gaps],
        "goal": "epoch_fraction <= 0.35 and best_gap <= 0.02",
        "met_fraction": fraction <= 0.35, "met_gap": gap <= 0.02, "met": met,
        "runs": {"fifo": fifo, "asha": ashas},
    }
    out = args.out or common.results_path("asha", args.quick, args.tag)
    common.write_results(out, "asha", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)

    rows = [("FIFO", fifo["trial_epochs"], "1.000", f"{fifo['best_val_loss']:.5f}", "",
             fifo["wall_s"])]
    for i, a in enumerate(ashas):
        rows.append((f"ASHA run {i + 1}", a["trial_epochs"], f"{fractions[i]:.3f}",
                     f"{a['best_val_loss']:.5f}", f"{gaps[i]:+.2%}", a["wall_s"]))
    print()
    print(common.table(rows, header=("scheduler", "trial-epochs", "fraction", "best val loss",
                                     "gap", "wall s")))
    print(f"\n{args.spec.name} {' '.join('--set ' + s for s in sets)}; scheduler "
          f"{yaml.safe_dump(spec.scheduler.model_dump(), default_flow_style=True).strip()}")
    print(f"goal fraction <= 0.35: {'met' if fraction <= 0.35 else 'NOT met'} ({fraction:.3f}); "
          f"goal gap <= 2%: {'met' if gap <= 0.02 else 'NOT met'} ({gap:+.2%})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

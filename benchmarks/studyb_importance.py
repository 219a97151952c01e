"""Which of Study B's hyperparameters matters most? The sweep of docs/results.md, its
importance and its winners trained on, from the commands the docs give.

Runs, in fresh processes, exactly:

    cae sweep sweeps/study_b_denoise.yaml --data-dir DATA --name studyb-imp --set ... (below)
    cae status RUN --importance
    cae extend RUN --epochs 4 --best-per latent_size

on Fashion-MNIST (a writable copy of ``../shared/data``, or ``--data-dir``), then writes
what docs/results.md quotes: the importance of the three axes with their intervals, the
best trial at each latent size beside PCA at the same latent size, and the winners before
and after ``cae extend``. The losses do not depend on the machine's load; the wall times
do (the load is recorded beside them).

    python benchmarks/studyb_importance.py           # 36 trials x 2 epochs, then 3 x 4 more
    python benchmarks/studyb_importance.py --quick   # 300 images, 1 epoch, a smoke run

Writes ``benchmarks/results/studyb-importance.json`` (``-quick`` with --quick).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

SETS = [
    "trial.data.dataset=fashion_mnist", "trial.data.train_limit=1500",
    "trial.data.test_limit=500", "trial.max_epochs=2",
    "space.model.convs={grid: [1, 2, 3]}", "space.model.latent_dim={grid: [4, 8, 32]}",
    "space.variant={grid: [{}, {model.batchnorm: false}, {model.edge_dropout: 0.1}, "
    "{model.dense_dropout: 0.2}]}",
    "space.model.channels=[32, 16]", "space.model.dense=[49, 40, 30, 20, 10]",
    "space.batch_size=32", "scheduler.kind=fifo", "resources.gpu=0",
]
QUICK = ["trial.data.train_limit=300", "trial.data.test_limit=100", "trial.max_epochs=1"]


def cae(*args: str, cwd: Path) -> tuple[float, list[float], str]:
    """Run ``cae ARGS`` in a fresh process: its wall seconds, the load before and after,
    and what it printed."""
    load = os.getloadavg()[0]
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "cae.cli", *args], cwd=cwd, text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"cae {' '.join(args[:2])} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return round(time.time() - t0, 1), [round(load, 2), round(os.getloadavg()[0], 2)], \
        done.stdout


def data_copy(where: Path) -> Path:
    """A writable copy of the offline archives (torchvision writes beside them)."""
    src = Path(os.environ.get("CAE_SHARED_DATA") or common.ROOT.parent / "shared" / "data")
    if not (src / "FashionMNIST" / "raw").is_dir():
        raise SystemExit(f"no Fashion-MNIST archives at {src} (set CAE_SHARED_DATA or "
                         "--data-dir)")
    shutil.copytree(src / "FashionMNIST", where / "FashionMNIST")
    return where


def best_per_latent(run: Path) -> list[dict]:
    """The best trial at each latent size, what it is, whether it was still improving, and
    PCA's validation loss at the same latent size."""
    import pandas as pd

    trials = pd.read_parquet(run / "trials.parquet")
    base = pd.read_parquet(run / "baselines.parquet")
    pca = base[(base["baseline"] == "pca") & (base["split"] == "val")].set_index(
        "latent_size")["loss"]
    rows = []
    for latent, group in trials.groupby("latent_size"):
        best = group.loc[group["best_val_loss"].idxmin()]
        variant = {c.removeprefix("variant."): best[c] for c in trials.columns
                   if c.startswith("variant.") and pd.notna(best[c])}
        rows.append({"latent_size": int(latent), "trial_id": best["trial_id"],
                     "convs": int(best["model.convs"]), "variant": variant,
                     "best_val_loss": float(best["best_val_loss"]),
                     "epochs": int(best["epochs"]),
                     "still_improving": bool(best.get("still_improving")),
                     "improvement_rate": float(best.get("improvement_rate") or "nan"),
                     "pca_val_loss": float(pca.get(float(latent), float("nan")))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 images, 1 epoch")
    p.add_argument("--data-dir", type=Path, help="dataset root (default: a copy of "
                   "../shared/data)")
    args = p.parse_args()
    started, info = common.now(), common.machine()
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data_dir or data_copy(tmp / "data")
        sets = SETS + (QUICK if args.quick else [])
        sweep = ["sweep", str(common.ROOT / "sweeps" / "study_b_denoise.yaml"), "--data-dir",
                 str(data), "--name", "studyb-imp", "--storage", str(tmp / "runs"),
                 "--no-report", "--report-every", "0"]
        for s in sets:
            sweep += ["--set", s]
        run = tmp / "runs" / "studyb-imp"
        sweep_s, sweep_load, _ = cae(*sweep, cwd=tmp)
        _, _, said = cae("status", str(run), "--importance", cwd=tmp)
        importance = pd.read_parquet(run / "importance.parquet")
        trials = pd.read_parquet(run / "trials.parquet")
        before = best_per_latent(run)
        extend_s, extend_load, _ = cae("extend", str(run), "--epochs", "4", "--best-per",
                                       "latent_size", "--name", "studyb-imp-extend",
                                       "--no-report", "--report-every", "0", cwd=tmp)
        after = best_per_latent(tmp / "runs" / "studyb-imp-extend")
    figures = {
        "commands": [" ".join(["cae", *sweep[:1], "sweeps/study_b_denoise.yaml", "--data-dir",
                               "DATA", "--name", "studyb-imp"] + [f"--set '{s}'" for s in sets]),
                     "cae status runs/studyb-imp --importance",
                     "cae extend runs/studyb-imp --epochs 4 --best-per latent_size"],
        "trials": len(trials), "trial_epochs": int(trials["epochs"].sum()),
        "sweep_wall_s": sweep_s, "sweep_load": sweep_load,
        "extend_wall_s": extend_s, "extend_load": extend_load,
        "importance": importance[["axis", "importance", "low", "high", "budget",
                                  "trials_used", "method"]].to_dict("records"),
        "status_lines": said.splitlines()[-8:],
        "best_per_latent": before, "extended": after,
        "trials_table": trials[[c for c in trials.columns if c in (
            "trial_id", "model.convs", "latent_size", "best_val_loss", "epochs")
            or c.startswith("variant.")]].to_dict("records"),
    }
    path = common.results_path("studyb-importance", args.quick)
    common.write_results(path, "studyb-importance", info, figures, started)
    print("\n".join(figures["status_lines"]))
    for b, a in zip(before, after):
        print(f"latent {b['latent_size']}: {b['best_val_loss']:.4f} -> {a['best_val_loss']:.4f}"
              f" (PCA {b['pca_val_loss']:.4f})")
    print(f"results in {path}")


if __name__ == "__main__":
    main()

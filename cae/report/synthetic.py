"""SYNTHETIC sweep frames, for timing the report at scale and for fast tests. Not results.

``synthetic_run`` makes ``trials`` and ``epochs`` frames shaped exactly like those of
``cae.results.tables.load_frames`` (same columns, same flattening of a ``variant`` axis, same
statuses and stop reasons) for any number of trials and epochs, without training anything.
The numbers follow a made-up law (error falls with latent size and depth, an optimum in the
learning rate, lognormal noise) only so that the figures look like a real sweep's; they say
nothing about real models.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from cae.report.run import Run
from cae.run.record import flatten

DISTORTION_FACTORS = {"noise": 0.8, "rotate": 1.6, "flip": 1.3, "patch": 1.1, "brightness": 0.6}

SPEC = {
    "name": "synthetic",
    "trial": {"data": {"dataset": "kmnist"}, "task": {"name": "denoise"},
              "model": {"channels": [16, 32], "bottleneck": "dense", "dense": [64],
                        "latent_dim": 8}, "max_epochs": 50, "patience": 5},
    "space": {
        "model.latent_dim": {"grid": [3, 4, 5, 8, 16, 32, 64, 128]},
        "model.channels": {"grid": [[8, 16], [16, 32], [32, 64], [32, 16]]},
        "model.convs": {"grid": [1, 2, 3, 4]},
        "lr": {"loguniform": [0.0001, 0.01]},
        "batch_size": {"choice": [32, 128, 512]},
        "variant": {"grid": [{}, {"model.batchnorm": True}, {"model.dropout": 0.2}]},
    },
    "scheduler": {"kind": "fifo"},
    "resources": {"cpu": 1, "gpu": 0.25},
}


def _point(rng: np.random.Generator, space: dict) -> dict:
    """A random point of the synthetic sweep's space."""
    return {
        "model.latent_dim": int(rng.choice(space["model.latent_dim"]["grid"])),
        "model.channels": space["model.channels"]["grid"][rng.integers(4)],
        "model.convs": int(rng.integers(1, 5)),
        "lr": float(10 ** rng.uniform(-4, -2)),
        "batch_size": int(rng.choice([32, 128, 512])),
        "variant": space["variant"]["grid"][rng.integers(3)],
    }


def _ending(rng: np.random.Generator, n_epochs: int, stop_early: bool) -> tuple[str, str, int]:
    """(status, stop reason, epochs run) of one synthetic trial."""
    u = rng.random() if stop_early else 1.0
    if u < 0.02:
        n = int(rng.integers(1, min(10, n_epochs) + 1))
        return "ERROR", f"error: Diverged: val loss became nan at epoch {n}", n
    if u < 0.03:
        return "RUNNING", "running", int(rng.integers(1, n_epochs + 1))
    if u < 0.18:
        return "TERMINATED", "patience", int(rng.integers(max(1, n_epochs // 3), n_epochs + 1))
    if u < 0.5 and n_epochs > 1:  # ASHA's rungs (grace 1, reduction factor 3)
        rungs = [r for r in (1, 3, 9, 27) if r < n_epochs]
        return "TERMINATED", "asha", int(rng.choice(rungs))
    return "TERMINATED", "max_epochs", n_epochs


def synthetic_run(n_trials: int = 1000, n_epochs: int = 50, task: str = "denoise",
                  seed: int = 0, stop_early: bool = True) -> Run:
    """A made-up sweep of ``n_trials`` x up to ``n_epochs`` (see the module doc).

    With ``stop_early`` about 15% of the trials stop by patience, 2% end in an error and 1%
    are still running; without it every trial runs all ``n_epochs`` (the largest frames).
    """
    rng = np.random.default_rng(seed)
    spec = json.loads(json.dumps(SPEC))
    spec["trial"]["task"]["name"] = task
    spec["trial"]["max_epochs"] = n_epochs
    space = spec["space"]
    base = flatten(spec["trial"])
    trials, epochs = [], []
    for i in range(n_trials):
        point = _point(rng, space)
        latent, ch, convs = point["model.latent_dim"], point["model.channels"], point["model.convs"]
        err = (0.012 + 0.05 / latent ** 0.6) * (1 - 0.07 * (convs - 1))
        err *= 1 + 0.6 * (math.log10(point["lr"]) + 2.7) ** 2
        err *= math.exp(rng.normal(0, 0.12))
        tau = rng.uniform(2, 9)
        status, reason, n = _ending(rng, n_epochs, stop_early)
        ep = np.arange(1, n + 1)
        val = err * (1 + 3 * np.exp(-(ep - 1) / tau)) * np.exp(rng.normal(0, 0.02, n))
        train = val * 0.96 * np.exp(rng.normal(0, 0.02, n))
        params = int(sum(9 * a * b for a, b in zip([1, *ch], ch)) * convs
                     + (ch[-1] * 49) * 64 * 2 + 64 * latent * 2)
        step = 0.5 + params / 2e5
        times = step * np.exp(rng.normal(0, 0.05, n))
        tid = f"5f3a2_{i:05d}"
        rows = {"trial_id": tid, "epoch": ep, "train_loss": train, "val_loss": val,
                "epoch_time_s": times, "time_total_s": np.cumsum(times) + 2.0}
        if task == "denoise":
            for name, f in DISTORTION_FACTORS.items():
                rows[f"val_loss_{name}"] = val * f
        epochs.append(pd.DataFrame(rows))
        best = int(np.argmin(val))
        row = {"trial_id": tid, **base, **flatten(point), "params": params,
               "latent_size": latent, "family": f"dense {len(ch)} stages x {convs} conv",
               "best_val_loss": float(val[best]), "best_epoch": best + 1,
               "last_val_loss": float(val[-1]), "epochs": n, "status": status,
               "stop_reason": reason, "wall_time_s": float(np.sum(times) + 2.0),
               "node_id": f"node{i % 4}", "hostname": f"gpu-{i % 4}", "device": "cuda:0",
               "num_failures": 0, "trial_dir": f"run_trial_{tid}"}
        if status == "TERMINATED":
            row["test_loss"] = float(val[best] * 1.03)
            if task == "denoise":
                flip_failed = rng.random() < 0.1  # some never learn to undo a flip
                for name, f in DISTORTION_FACTORS.items():
                    bad = 3.0 if flip_failed and name == "flip" else 1.0
                    row[f"test_loss_{name}"] = float(val[best] * 1.03 * f * bad)
        trials.append(row)
    return Run(trials=pd.DataFrame(trials), epochs=pd.concat(epochs, ignore_index=True),
               spec=spec, path=None)

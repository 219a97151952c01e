"""What does the reproducible dropout cost a trial? Its training step against nn.Dropout's.

Every trial, fused or not, draws its dropout masks from a hash of (seed, layer, step,
element) (``cae.train.stacked.MaskedDropout``), so that a trial and its twin in a pack draw
the same masks. This measures what that costs one trial's training step against PyTorch's
own ``nn.Dropout`` (which draws from the global generator), on the same model: the
quickstart's base CAE with dropout 0.1 in every stage and in its dense layers, on the
embedded sample, batch size 64, one thread (a trial's default share), in plain PyTorch.

Both sides are a ``cae.train.trainer.Trainer`` of the same config; on the baseline side its
``MaskedDropout`` layers are put back to ``nn.Dropout`` of the same rate. Each round times
one training epoch (``Trainer.train_epoch``: every step's forward, loss, backward and
optimiser step) of each side, alternating which goes first, so a change in the machine's
load hits both. ``ratio`` = the median masked epoch / the median ``nn.Dropout`` epoch
(> 1: the masks cost that much more); the first round is a warm-up and left out.

    python benchmarks/dropout.py            # 9 rounds
    python benchmarks/dropout.py --quick    # 3 rounds on 600 images, a smoke run

Writes ``benchmarks/results/dropout.json`` (``dropout-quick.json`` with --quick); its last
line is ``ratio R``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

MODEL = {"channels": [4, 8], "bottleneck": "dense", "dense": [64], "latent_dim": 8,
         "dropout": 0.1, "dense_dropout": 0.1}


def config(train_limit: int | None):
    from cae.config.trial import TrialConfig

    data = {"dataset": "sample", **({"train_limit": train_limit} if train_limit else {})}
    return TrialConfig.model_validate({
        "data": data, "task": {"name": "reconstruct"}, "model": MODEL, "lr": 0.003,
        "batch_size": 64, "max_epochs": 1000, "patience": None, "seed": 0, "device": "cpu"})


def with_torch_dropout(trainer) -> int:
    """Put ``nn.Dropout`` back in place of the trainer's masked dropout layers; how many."""
    from torch import nn

    from cae.train.stacked import MaskedDropout

    swapped = 0
    for part in (trainer.model.encoder, trainer.model.decoder):
        for i, layer in enumerate(part):
            if isinstance(layer, MaskedDropout):
                part[i] = nn.Dropout(float(layer.rate))
                swapped += 1
    return swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds on 600 images")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    started, info = common.now(), common.machine()

    import torch

    from cae.data.datasets import load
    from cae.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config(600 if args.quick else None)
    data = load(cfg.data)
    masked, plain = Trainer(cfg, data), Trainer(cfg, data)
    layers = with_torch_dropout(plain)
    assert layers >= 3, "the model should have dropout in every stage"
    times: dict[str, list[float]] = {"masked": [], "nn.Dropout": []}
    sides = {"masked": masked, "nn.Dropout": plain}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            t0 = time.perf_counter()
            sides[name].train_epoch()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f} s"
                                                      for n in sides), flush=True)
    kept = {n: t[1:] for n, t in times.items()}
    steps = masked.steps_per_epoch
    median = {n: statistics.median(t) for n, t in kept.items()}
    ratio = median["masked"] / median["nn.Dropout"]
    figures = {
        "model": MODEL, "images": int(masked.splits.train.shape[0]), "batch_size": 64,
        "steps_per_epoch": steps, "dropout_layers": layers, "threads": 1, "rounds": rounds,
        "epoch_s": times, "median_epoch_s": median,
        "median_step_ms": {n: 1000 * m / steps for n, m in median.items()},
        "ratio": ratio,
    }
    path = common.write_results(common.results_path("dropout", args.quick), "dropout", info,
                                figures, started)
    print(common.table([(n, f"{1000 * median[n] / steps:.2f}") for n in sides],
                       ("side", "median step ms")))
    print(f"load average at start {info['load_avg_start']}; results in {path}")
    print(f"ratio {ratio:.3f}")


if __name__ == "__main__":
    main()

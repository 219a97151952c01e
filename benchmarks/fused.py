"""On the CPU: a fused pack of K members against K separate trials, the same work.

K trials of the quickstart's base CAE (lr x seed) on the embedded Fashion-MNIST sample,
batch 128, one thread (a ``cpu: 1`` trial): one training epoch of a ``cae.train.pack.Pack`` of K
members against one training epoch of each of K separate ``cae.train.trainer.Trainer`` runs, the two
sides alternating over rounds so that a change in the machine's load hits both. ``ratio`` =
(K separate epochs' time) / (the pack's epoch time): above 1 the pack trains more trials
per hour. The first epoch of each side is a warm-up.

    python benchmarks/fused.py            # K = 1, 4, 8; 3 rounds
    python benchmarks/fused.py --quick    # K = 1, 4; 1 round, 1,000 images

Writes ``benchmarks/results/fused.json`` (``fused-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

MODEL = {"channels": [4, 8], "bottleneck": "dense", "dense": [64], "latent_dim": 8}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--members", default=None, help="pack sizes (default 1,4,8; 1,4 --quick)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 3, 1 --quick)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()
    sizes = [int(k) for k in (args.members or ("1,4" if args.quick else "1,4,8")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)

    import torch

    from cae.config.trial import TrialConfig
    from cae.data.datasets import load
    from cae.train.pack import Pack
    from cae.train.trainer import Trainer

    torch.set_num_threads(1)
    limit = 1000 if args.quick else None
    cfgs = [TrialConfig.model_validate({
        "data": {"dataset": "sample", "train_limit": limit}, "model": MODEL,
        "lr": [0.001, 0.002, 0.003, 0.005][i % 4], "seed": i // 4, "batch_size": 128,
        "max_epochs": 100, "patience": None, "device": "cpu"}) for i in range(max(sizes))]
    data = load(cfgs[0].data)
    rows = []
    for k in sizes:
        pack = Pack(cfgs[:k], data, evaluate_test=False)
        separate = [Trainer(c, data) for c in cfgs[:k]]
        pack.train_epoch()  # warm-up
        for t in separate:
            t.train_epoch()
        pack_s, sep_s = [], []
        for r in range(rounds):
            sides = [("pack", pack.train_epoch),
                     ("separate", lambda ts=separate: [t.train_epoch() for t in ts])]
            for name, fn in sides if r % 2 == 0 else sides[::-1]:
                (pack_s if name == "pack" else sep_s).append(_timed(fn))
        n = pack.splits.train.shape[0]
        row = {"members": k, "images": n, "pack_epoch_s": [round(x, 3) for x in pack_s],
               "separate_epochs_s": [round(x, 3) for x in sep_s],
               "ratio": round(common.median(sep_s) / common.median(pack_s), 3),
               "ratio_per_round": [round(s / q, 3) for s, q in zip(sep_s, pack_s)]}
        rows.append(row)
        print(f"K={k}: pack {common.median(pack_s):.2f} s, {k} separate "
              f"{common.median(sep_s):.2f} s, ratio {row['ratio']:.3f}", flush=True)
    figures = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "model": MODEL,
               "batch_size": 128, "threads": 1, "rounds": rounds, "packs": rows}
    out = args.out or common.results_path("fused", args.quick)
    common.write_results(out, "fused", info, figures, started)
    print(common.table([(r["members"], r["ratio"], common.median(r["pack_epoch_s"]),
                         common.median(r["separate_epochs_s"])) for r in rows],
                       header=("members", "ratio", "pack epoch s", "separate epochs s")))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

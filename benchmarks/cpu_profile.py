"""Where a CPU trial's time goes, and what makes it faster (a benchmark, not a test).

The heaviest model of the peer grid (``benchmarks/peer.py``: channels [32, 32], 2 convs per
stage, dense bottleneck, latent 16, batch 64, Adam, MSE) on 6,000 Fashion-MNIST images
(5,143 train after the split; the embedded sample with --quick or without
../shared/data), on ONE thread: a trial's share of a 2-core machine running two trials.

1. Profile: ``torch.profiler`` over one training epoch (after a warm-up epoch), self CPU
   time grouped by what the op does: convolution forward and backward, pooling and
   upsampling, activations, dense layers, the optimizer step, batch preparation and layout
   copies (indexing, uint8 to float, channels_last), the rest;
   plus the 12 ops with the most self time.
2. What else could make it faster, as images/s of a training epoch against the default
   (fp32, channels_last, eager, 1 thread), sides alternating over ``--rounds``, medians:
   NCHW instead of channels_last; ``torch.compile`` (its compile time reported apart);
   bf16 autocast; and 2 threads on one trial (2 trials x 1 thread use the same 2 cores:
   worth it only if 2 threads give a trial more than 2x the images/s of 1).

    python benchmarks/cpu_profile.py            # needs ../shared/data (Fashion-MNIST)
    python benchmarks/cpu_profile.py --quick    # the embedded sample, 1 round

Writes ``benchmarks/results/cpu_profile.json`` (``cpu_profile-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

GROUPS = (  # (group, substrings of the op name), first match wins
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "conv2d")),
    ("pooling and upsampling", ("pool", "upsample", "max_unpool")),
    ("activations (ReLU, sigmoid)", ("threshold", "clamp_min", "relu", "sigmoid")),
    ("dense layers", ("addmm", "aten::mm", "linear")),
    ("optimizer step", ("_foreach", "adam", "addcdiv", "lerp", "sqrt")),
    ("batch preparation and layout copies", ("index", "gather", "randperm", "to_copy",
                                             "copy_", "div_", "contiguous", "_to_dtype")),
)


def _group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "rest")


def make_trainer(data, precision: str = "fp32", compile_: bool = False, nchw: bool = False):
    import torch

    from cae.config.trial import TrialConfig
    from cae.train.trainer import Trainer

    cfg = TrialConfig.model_validate({
        "data": {"dataset": data.name, "val_fraction": 1 / 7},
        "model": {"channels": [32, 32], "convs": 2, "bottleneck": "dense", "dense": [],
                  "latent_dim": 16},
        "lr": 1e-3, "batch_size": 64, "max_epochs": 100, "patience": None,
        "precision": precision, "compile": compile_, "seed": 0,
    })
    trainer = Trainer(cfg, data)
    if nchw:  # undo the default channels_last layout, for the comparison
        trainer.model.to(memory_format=torch.contiguous_format)
        trainer._inputs = lambda x: x.contiguous()
    return trainer


def timed_epoch(trainer) -> float:
    t0 = time.perf_counter()
    trainer.train_epoch()
    trainer.epoch += 1
    return time.perf_counter() - t0


def profile(data) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    trainer = make_trainer(data)
    timed_epoch(trainer)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_epoch(trainer)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        g = _group(e.key)
        groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    del torch
    return {
        "self_cpu_s": round(total / 1e6, 3),
        "share": {g: round(v / total, 4) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "group": _group(e.key), "calls": e.count,
                     "share": round(e.self_cpu_time_total / total, 4)} for e in top],
    }


def variants(data, rounds: int) -> dict:
    import torch

    n = data.train.shape[0] - round(data.train.shape[0] / 7)
    sides = {
        "default (fp32, channels_last, eager, 1 thread)": dict(),
        "NCHW": dict(nchw=True),
        "torch.compile": dict(compile_=True),
        "bf16 autocast": dict(precision="bf16"),
        "2 threads": dict(threads=2),
    }
    trainers, compile_s = {}, None
    for name, kw in sides.items():
        kw = dict(kw)
        threads = kw.pop("threads", 1)
        torch.set_num_threads(threads)
        trainers[name] = (make_trainer(data, **kw), threads)
        t = timed_epoch(trainers[name][0])  # warm-up (compiles)
        if kw.get("compile_"):
            compile_s = t
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            trainer, threads = trainers[name]
            torch.set_num_threads(threads)
            times[name].append(timed_epoch(trainer))
    torch.set_num_threads(1)
    base = common.median(times[order[0]])
    out = {}
    for name in order:
        med = common.median(times[name])
        out[name] = {"epoch_s": [round(t, 3) for t in times[name]],
                     "images_per_s": round(n / med, 1), "vs_default": round(base / med, 3)}
    out["torch.compile"]["first_epoch_with_compile_s"] = round(compile_s, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the embedded sample, one round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    started = common.now()

    import torch

    from cae.config.trial import DataConfig
    from cae.data.datasets import load

    torch.set_num_threads(1)
    tmp = common.tempdir("cpu-profile")
    root = None if args.quick else common.writable_data_copy("FashionMNIST", tmp)
    if root is None:
        cfg = DataConfig(dataset="sample", train_limit=2000)
    else:
        cfg = DataConfig(dataset="fashion_mnist", data_dir=str(root), train_limit=6000,
                         test_limit=1000)
    data = load(cfg)
    rounds = 1 if args.quick else args.rounds
    prof = profile(data)
    var = variants(data, rounds)
    figures = {"what": f"peer grid's heaviest model, {data.name} {data.train.shape[0]} "
                       "images (1/7 validation), batch 64, one thread",
               "rounds": rounds, "profile": prof, "variants": var}
    path = common.write_results(common.results_path("cpu_profile", args.quick), "cpu_profile",
                                common.machine(), figures, started)
    print(common.table([(g, f"{s:.1%}") for g, s in prof["share"].items()],
                       ("self CPU time of a training epoch", "share")))
    print(common.table([(k, v["images_per_s"], v["vs_default"]) for k, v in var.items()],
                       ("variant", "images/s", "vs default")))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

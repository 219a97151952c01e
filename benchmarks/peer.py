"""`cae sweep` against a sweep written the way Ray Tune's PyTorch tutorial writes one.

The same 16-point grid (latent 4/16/64/128 x channels [8, 8] or [32, 32] x 1 or 2 convs per
stage; dense bottleneck, the same CAE modules from ``cae.model.network``), the same 6,000
Fashion-MNIST training and 1,000 validation images (our split of the first 7,000), batch
64, Adam 1e-3, MSE, 9 epochs, one CPU per trial, two trials at a time on two cores, a
checkpoint every epoch on both sides:

- peer: a function trainable that builds ``torchvision.datasets.FashionMNIST`` with
  ``transforms.ToTensor()``, iterates ``DataLoader(Subset(...), batch_size=64,
  shuffle=True)``, trains in fp32, evaluates the validation images each epoch and reports
  with ``tune.report`` and a checkpoint; grid trials in grid order;
- ours: ``cae sweep`` on a spec of that grid (device-resident uint8 data, the precision
  ``auto`` picks here: fp32 on a CPU, a seeded shuffled trial order), run as a user runs
  it (a process: Ray start, data load, sweep, export, baselines; no report).

Each side under FIFO and under Ray's ASHA (no strata on our side, so both run the same
scheduler), alternating sides; ours also under successive halving per latent size, as it
ships (``sha`` with ``work_ahead``, the default of the quickstart) and as it was before
work ahead (``work_ahead: false``). Figures: wall time of each sweep, trial-epochs, best val
loss; ``wall_ratio_fifo`` and ``wall_ratio_asha`` = ours / peer (goal: FIFO <= 0.5);
``wall_ratio_trust`` = our default's wall / the peer's FIFO wall (the time to the
trustworthy answer: the peer's ASHA is faster but its answer depends on the trial order,
so FIFO is the peer's trustworthy answer), with our default's winner and best val loss at
each latent size against our FIFO's (goal: within 3%). With
``--precision-check`` our FIFO sweep runs once more in the other precision (bf16 on a
CPU): per-trial best val loss of bf16 against fp32 (goal: every trial within 1%, the same
best trial) and the wall-time ratio.

    python benchmarks/peer.py --precision-check     # needs ../shared/data (Fashion-MNIST)
    python benchmarks/peer.py --quick               # 2 epochs, 2,000 images: a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

LATENTS, CHANNELS, CONVS = [4, 16, 64, 128], [[8, 8], [32, 32]], [1, 2]


def grid_spec(data_dir: str, n: int, epochs: int, scheduler: dict, precision: str) -> dict:
    return {
        "name": "peer-ours",
        "trial": {"data": {"dataset": "fashion_mnist", "data_dir": data_dir, "train_limit": n,
                           "test_limit": 1000, "val_fraction": 1 / 7, "download": True},
                  "model": {"bottleneck": "dense", "dense": [], "latent_dim": 4},
                  "lr": 1e-3, "batch_size": 64, "max_epochs": epochs, "patience": None,
                  "precision": precision},
        "space": {"model.latent_dim": {"grid": LATENTS}, "model.channels": {"grid": CHANNELS},
                  "model.convs": {"grid": CONVS}},
        "scheduler": scheduler, "resources": {"cpu": 1, "gpu": 0}, "max_failures": 0,
    }


def run_ours(spec: dict, storage: Path, name: str) -> dict:
    import pandas as pd
    import yaml

    path = storage / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([*common.cae_command(), "sweep", str(path), "--storage", str(storage),
                           "--name", name, "--no-report"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (storage / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"our sweep {name} failed; see {storage / name}.log")
    trials = pd.read_parquet(storage / name / "trials.parquet")
    key = trials["model.latent_dim"].astype(str) + " " + trials["model.channels"].astype(str) \
        + " " + trials["model.convs"].astype(str)
    ahead = trials.get("speculative_epochs", 0)
    return {"wall_s": round(wall, 2),
            "trial_epochs": int((trials["epochs"] + ahead).sum()),  # trained, counted or not
            "best_val_loss": float(trials["best_val_loss"].min()),
            "precision": sorted(set(trials["precision"].dropna())),
            "per_trial": dict(zip(key, trials["best_val_loss"].astype(float)))}


def per_latent(run: dict) -> dict:
    """Each latent size's winner (``latent channels convs``) and best val loss."""
    out = {}
    for key, value in run["per_trial"].items():
        latent = key.split(" ", 1)[0]
        if latent not in out or value < out[latent][1]:
            out[latent] = (key, value)
    return out


def answer_vs_fifo(run: dict, fifo: dict) -> dict:
    """Per latent size: the run's winner and best against FIFO's, and the gap."""
    ours, ref = per_latent(run), per_latent(fifo)
    rows = {lat: {"winner": ours[lat][0], "best_val_loss": ours[lat][1],
                  "fifo_winner": ref[lat][0], "fifo_best_val_loss": ref[lat][1],
                  "gap": round(ours[lat][1] / ref[lat][1] - 1, 5)} for lat in ref}
    return {"per_latent": rows, "worst_gap": max(r["gap"] for r in rows.values()),
            "same_winners": all(r["winner"] == r["fifo_winner"] for r in rows.values())}


def peer_trial(config: dict, data_dir: str, train_idx: list, val_idx: list, epochs: int):
    """The tutorial's way: a torchvision dataset with ToTensor, DataLoaders, fp32."""
    import os

    import torch
    import torchvision
    from ray import tune
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    from cae.config.trial import TrialConfig
    from cae.model.network import build_model

    torch.manual_seed(0)
    ds = torchvision.datasets.FashionMNIST(data_dir, train=True, download=False,
                                           transform=transforms.ToTensor())
    train = DataLoader(Subset(ds, train_idx), batch_size=64, shuffle=True)
    val = DataLoader(Subset(ds, val_idx), batch_size=1000)
    cfg = TrialConfig.model_validate({"data": {"dataset": "fashion_mnist"}, "model": {
        "bottleneck": "dense", "dense": [], "latent_dim": config["latent"],
        "channels": config["channels"], "convs": config["convs"]}})
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    for epoch in range(1, epochs + 1):
        model.train()
        for x, _ in train:
            opt.zero_grad()
            loss = loss_fn(model(x), x)
            loss.backward()
            opt.step()
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, _ in val:
                total += loss_fn(model(x), x).item() * len(x)
                count += len(x)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch},
                       os.path.join(d, "checkpoint.pt"))
            tune.report({"epoch": epoch, "val_loss": total / count},
                        checkpoint=tune.Checkpoint.from_directory(d))


def run_peer(data_dir: str, n: int, epochs: int, asha: bool, storage: Path, name: str) -> dict:
    import ray
    import torch
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    gen = torch.Generator().manual_seed(0)  # the split cae.data.datasets.split makes of the first n
    perm = torch.randperm(n, generator=gen).tolist()
    n_val = round(n / 7)
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_parameters(peer_trial, data_dir=data_dir, train_idx=perm[n_val:],
                                         val_idx=perm[:n_val], epochs=epochs)
        sched = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1,
                               reduction_factor=3) if asha else FIFOScheduler())
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"latent": tune.grid_search(LATENTS),
                         "channels": tune.grid_search(CHANNELS),
                         "convs": tune.grid_search(CONVS)},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=sched),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    frames = [r.metrics_dataframe for r in results]
    return {"wall_s": round(wall, 2), "trial_epochs": int(sum(len(f) for f in frames)),
            "best_val_loss": float(min(f["val_loss"].min() for f in frames))}


def summarize(runs: dict, n: int, epochs: int, precision: tuple[str, str] | None) -> dict:
    """The figures of the runs done so far (the results file is written after each run,
    so that a long benchmark cut short keeps what it measured)."""
    def ratio(a: str, b: str) -> float | None:
        return round(runs[a]["wall_s"] / runs[b]["wall_s"], 3) if a in runs and b in runs \
            else None

    figures = {
        "what": f"16-point grid, {n - round(n / 7)} train / {round(n / 7)} val Fashion-MNIST "
                f"images, batch 64, {epochs} epochs, 1 CPU per trial; wall time of each sweep",
        "wall_ratio_fifo": ratio("ours_fifo", "peer_fifo"),
        "wall_ratio_asha": ratio("ours_asha", "peer_asha"),
        "wall_ratio_trust": ratio("ours_default", "peer_fifo"),
        "default_vs_sha_wall": ratio("ours_default", "ours_sha"),
        "goal": "wall_ratio_fifo <= 0.5; default within 3% of FIFO at every latent size",
        "runs": runs,
    }
    for name in ("default", "sha"):
        if f"ours_{name}" in runs and "ours_fifo" in runs:
            figures[f"{name}_answer"] = answer_vs_fifo(runs[f"ours_{name}"], runs["ours_fifo"])
    if figures["wall_ratio_fifo"] is not None:
        figures["met"] = figures["wall_ratio_fifo"] <= 0.5
    if "default_answer" in figures:
        figures["default_met"] = figures["default_answer"]["worst_gap"] <= 0.03
    if precision and "ours_other_fifo" in runs:
        default, other = precision
        runs_by = {default: runs["ours_fifo"], other: runs["ours_other_fifo"]}
        bf16, fp32 = runs_by["bf16"]["per_trial"], runs_by["fp32"]["per_trial"]
        diffs = {k: bf16[k] / fp32[k] - 1 for k in fp32}
        figures["precision_check"] = {
            "default_precision": default,
            "max_abs_rel_diff_bf16_vs_fp32": round(max(abs(d) for d in diffs.values()), 5),
            "per_trial_rel_diff": {k: round(v, 5) for k, v in diffs.items()},
            "same_best_trial": min(bf16, key=bf16.get) == min(fp32, key=fp32.get),
            "wall_ratio_bf16_vs_fp32": round(runs_by["bf16"]["wall_s"]
                                             / runs_by["fp32"]["wall_s"], 3),
        }
    return figures


def _data():
    """A temp dir and a writable, extracted copy of Fashion-MNIST in it (None, with a
    line on stderr, without ../shared/data)."""
    tmp = common.tempdir("peer")
    data = common.writable_data_copy("FashionMNIST", tmp)
    if data is None:
        print("peer.py needs ../shared/data (Fashion-MNIST)", file=sys.stderr)
        return tmp, None
    import torchvision

    torchvision.datasets.FashionMNIST(str(data), train=True, download=True)  # extract once
    return tmp, data


def default_vs_sha(rounds: int, quick: bool) -> int:
    """Our default scheduler against plain SHA on the peer grid, sides alternating, the
    median wall of each and their ratio; the same answer checked in every round."""
    started, info = common.now(), common.machine()
    epochs, n = (2, 2000) if quick else (9, 7000)
    tmp, data = _data()
    if data is None:
        return 2
    sides = {"default": {"kind": "sha", "stratify": ["model.latent_dim"]},
             "sha": {"kind": "sha", "stratify": ["model.latent_dim"], "work_ahead": False}}
    runs: dict[str, list] = {"default": [], "sha": []}
    out = common.results_path("peer-default-vs-sha", quick)
    for r in range(rounds):
        for side in (("default", "sha") if r % 2 == 0 else ("sha", "default")):
            print(f"round {r + 1}: ours {side} ...", flush=True)
            spec = grid_spec(str(data), n, epochs, sides[side], "auto")
            runs[side].append(run_ours(spec, tmp, f"{side}-{r}"))
            walls = {k: [x["wall_s"] for x in v] for k, v in runs.items()}
            figures = {
                "walls_s": walls,
                "answers_equal": all(per_latent(a) == per_latent(b)
                                     for a, b in zip(runs["default"], runs["sha"])),
                "default_vs_sha_wall": (round(common.median(walls["default"])
                                              / common.median(walls["sha"]), 3)
                                        if walls["default"] and walls["sha"] else None),
                "trial_epochs": {k: [x["trial_epochs"] for x in v] for k, v in runs.items()},
            }
            common.write_results(out, "peer-default-vs-sha", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(figures, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 epochs on 2,000 images")
    p.add_argument("--precision-check", action="store_true",
                   help="also our FIFO sweep in the other precision: per-trial best val "
                        "loss of bf16 against fp32")
    p.add_argument("--default-vs-sha", type=int, metavar="ROUNDS", default=0,
                   help="only our default (sha with work_ahead) and plain sha, alternating "
                        "for ROUNDS rounds: is the default ever slower (peer-default-vs-sha"
                        ".json)")
    args = p.parse_args(argv)
    if args.default_vs_sha:
        return default_vs_sha(args.default_vs_sha, args.quick)
    started, info = common.now(), common.machine()
    epochs, n = (2, 2000) if args.quick else (9, 7000)
    tmp, data = _data()
    if data is None:
        return 2
    scheds = {"fifo": {"kind": "fifo"}, "asha": {"kind": "asha", "stratify": []},
              "default": {"kind": "sha", "stratify": ["model.latent_dim"]},
              "sha": {"kind": "sha", "stratify": ["model.latent_dim"], "work_ahead": False}}
    runs = {}
    # what the trustworthy answer needs first: peer FIFO, our FIFO, default and plain SHA
    order = [("peer", "fifo"), ("ours", "fifo"), ("ours", "default"), ("ours", "sha"),
             ("ours", "asha"), ("peer", "asha")]
    import torch

    from cae.train.hardware import resolve_precision

    default = resolve_precision("auto", torch.device("cpu"))
    other = "bf16" if default == "fp32" else "fp32"
    precision = (default, other) if args.precision_check else None
    if args.precision_check:
        order.append(("ours-other", "fifo"))
    out = common.results_path("peer", args.quick)
    for side, sched in order:
        print(f"{side} {sched} ...", flush=True)
        if side == "peer":
            runs[f"peer_{sched}"] = run_peer(str(data), n, epochs, sched == "asha", tmp,
                                             f"peer-{sched}")
        else:
            prec = other if side == "ours-other" else "auto"
            spec = grid_spec(str(data), n, epochs, scheds[sched], prec)
            runs[f"{side.replace('-', '_')}_{sched}"] = run_ours(spec, tmp, f"{side}-{sched}")
        figures = summarize(runs, n, epochs, precision)
        common.write_results(out, "peer", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [(k, r["wall_s"], r["trial_epochs"], f"{r['best_val_loss']:.5f}")
            for k, r in runs.items()]
    print(common.table(rows, ("sweep", "wall s", "trial-epochs", "best val loss")))
    print(f"wall ratio FIFO {figures['wall_ratio_fifo']}, ASHA {figures['wall_ratio_asha']} "
          f"(goal FIFO <= 0.5: {'met' if figures['met'] else 'NOT met'}); to the trustworthy "
          f"answer {figures['wall_ratio_trust']} (default / peer FIFO); default / SHA "
          f"{figures['default_vs_sha_wall']}; default's worst gap to FIFO "
          f"{figures['default_answer']['worst_gap']:+.2%}")
    if args.precision_check:
        print(json.dumps({k: v for k, v in figures["precision_check"].items()
                          if k != "per_trial_rel_diff"}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

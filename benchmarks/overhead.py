"""What does Ray Tune cost one trial? images/s under Ray Tune against plain PyTorch.

Both sides train the same model on the same data with the same batch size, seed and
thread count:

- plain: ``cae.train.trainer.Trainer(cfg, data).fit()`` in this process, no Ray anywhere;
- Ray Tune: the same TrialConfig as a one-point sweep through ``cae.cli.main(["sweep", ...])``
  (FIFO, ``resources.cpu`` = the thread count, per-epoch checkpoints and reports as in any
  sweep), in a Ray worker process.

images/s = training images / ``epoch_time_s`` (the trainer's own clock: the training
epoch plus the validation pass), over the same epochs on both sides, the first epoch
(warm-up) left out. ``ratio`` = the median Ray Tune epoch's images/s / the median plain
epoch's (goal >= 0.95): on a shared machine another process's burst slows single epochs,
and the median is what the two loops do without it; ``ratio_mean`` (total images / total
seconds) is kept beside it. CPU use by role (this driver, Ray workers, Ray's daemons) is
sampled from /proc, to show where a shortfall would come from.
``ratio_wall`` is stricter: the Ray side's time between two reports (``time_this_iter_s``,
which adds the checkpoint write and the report) against the plain epoch; the last epoch is
left out of it because only a sweep's last epoch also runs the test evaluation.

The sides alternate over ``--rounds`` (plain first in odd rounds, Ray first in even ones),
so a change in the machine's load hits both. Ray is started once, before the first round.

    python benchmarks/overhead.py            # Fashion-MNIST (60k) when ../shared/data has it
    python benchmarks/overhead.py --quick    # the embedded sample, a smoke run

Writes ``benchmarks/results/overhead.json`` (``overhead-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

from cae.config.catalog import DATASETS  # noqa: E402

# The quickstart's base model: a small dense-bottleneck CAE for 28x28 images.
MODEL = {"channels": [4, 8], "bottleneck": "dense", "dense": [64], "latent_dim": 8}


def trial_dict(dataset: str, epochs: int, batch_size: int, train_limit: int | None) -> dict:
    data = {"dataset": dataset}
    if train_limit:
        data["train_limit"] = train_limit
    return {"data": data, "task": {"name": "reconstruct"}, "model": dict(MODEL),
            "lr": 0.003, "batch_size": batch_size, "max_epochs": epochs, "patience": None,
            "seed": 0, "device": "cpu"}


def process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and its descendants (Ray's
    raylet, GCS, workers...), by pid, with a role: driver, worker or ray (Linux /proc)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(d.name)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tick)
    me, out, todo = os.getpid(), {}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in procs:
            cmd = procs[pid][1]
            role = "driver" if pid == me else ("worker" if "default_worker" in cmd or "ray::"
                                                in cmd else "ray")
            out[pid] = (role, procs[pid][2])
        todo.extend(children.get(pid, []))
    return out


class CpuWatch:
    """Keeps the latest CPU seconds of every descendant process, sampled each second, so that
    processes which end before the run does (a trial's worker) are still counted."""

    def __init__(self, period: float = 1.0):
        import threading

        self.before = process_cpu()
        self.latest = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.latest.update(process_cpu())

    def stop(self, wall: float) -> dict:
        self._stop.set()
        self._thread.join()
        self.latest.update(process_cpu())
        return cpu_delta(self.before, self.latest, wall)


def cpu_delta(before: dict, after: dict, wall: float) -> dict:
    """CPU seconds per role between two snapshots, and in cores (CPU s / wall s)."""
    sums = {"driver": 0.0, "worker": 0.0, "ray": 0.0}
    for pid, (role, t) in after.items():
        sums[role] += t - (before[pid][1] if pid in before else 0.0)
    return {**{f"{k}_cpu_s": round(v, 2) for k, v in sums.items()},
            **{f"{k}_cores": round(v / wall, 3) for k, v in sums.items()}, "wall_s": round(wall, 2)}


def run_plain(trial: dict, data, threads: int) -> dict:
    """Train in this process; per-epoch seconds from the trainer's history."""
    import time

    import torch

    from cae.config.trial import TrialConfig
    from cae.train.trainer import Trainer

    torch.set_num_threads(threads)
    cfg = TrialConfig.model_validate(json.loads(json.dumps(trial)))
    watch = CpuWatch()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, data)
    trainer.fit()
    total = time.perf_counter() - t0
    return {"n_train": int(trainer.splits.train.shape[0]), "cpu": watch.stop(total),
            "epoch_time_s": [h["epoch_time_s"] for h in trainer.history],
            "wall_s": [h["epoch_time_s"] for h in trainer.history],  # nothing else per epoch
            "total_s": total}


def run_ray(trial: dict, threads: int, storage: Path, name: str, data_dir: str | None,
            log: Path) -> dict:
    """The same trial as a one-point sweep through the CLI; per-epoch seconds from Ray's
    result.json (ours: epoch_time_s; Ray's: time_this_iter_s)."""
    import time

    import yaml

    from cae import cli

    spec = {"name": "overhead", "trial": trial, "space": {}, "scheduler": {"kind": "fifo"},
            "resources": {"cpu": threads, "gpu": 0}, "max_failures": 0,
            "storage": str(storage)}
    spec_path = storage / f"{name}.yaml"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    argv = ["sweep", str(spec_path), "--name", name, "--no-report"]
    if data_dir:
        argv += ["--data-dir", data_dir]
    buf = io.StringIO()
    watch = CpuWatch()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    total = time.perf_counter() - t0
    cpu = watch.stop(total)
    log.write_text(buf.getvalue())
    if rc != 0:
        raise SystemExit(f"the Ray Tune side failed (exit {rc}); see {log}")
    run_dir = storage / name
    result_files = list(run_dir.glob("*/result.json"))
    if len(result_files) != 1:
        raise SystemExit(f"expected one trial in {run_dir}, found {len(result_files)}")
    rows = [json.loads(line) for line in result_files[0].read_text().splitlines() if line]
    rows.sort(key=lambda r: r["epoch"])
    return {"epoch_time_s": [r["epoch_time_s"] for r in rows],
            "wall_s": [r["time_this_iter_s"] for r in rows],
            "total_s": total, "trial_time_total_s": rows[-1]["time_total_s"], "cpu": cpu}


def throughput(n_train: int, seconds: list[float]) -> float:
    return n_train * len(seconds) / sum(seconds) if seconds else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="the embedded sample (3,600 training images), 1 + 3 epochs, 1 round")
    p.add_argument("--dataset", choices=["sample", "fashion_mnist", "mnist"],
                   help="default: fashion_mnist from ../shared/data if present, else sample; "
                        "sample with --quick")
    p.add_argument("--epochs", type=int, help="timed epochs after the warm-up one "
                                              "(default 5, 3 with --quick)")
    p.add_argument("--rounds", type=int, help="plain/Ray pairs (default 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads = the trial's resources.cpu (default 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-limit", type=int, help="first N training images only")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()
    epochs = args.epochs or (3 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)

    tmp = common.tempdir("overhead")
    data_dir = None
    dataset = args.dataset or ("sample" if args.quick else "fashion_mnist")
    if dataset != "sample":
        folder = DATASETS[dataset].folder
        root = common.writable_data_copy(folder, tmp)
        if root is None:
            if args.dataset:
                raise SystemExit(f"{dataset}: no {folder}/raw in ../shared/data or "
                                 "$CAE_SHARED_DATA")
            print(f"note: no {folder} in ../shared/data; using the embedded sample")
            dataset = "sample"
        else:
            data_dir = str(root)
    trial = trial_dict(dataset, 1 + epochs, args.batch_size, args.train_limit)
    if data_dir:
        trial["data"]["data_dir"] = data_dir
        trial["data"]["download"] = False

    from cae.config.trial import DataConfig
    from cae.data.datasets import load
    from cae.sweep import tuner

    data = load(DataConfig.model_validate(trial["data"]))
    tuner.init_ray(None)  # once; every Ray side of every round reuses it

    plain, ray_runs = [], []
    try:
        for r in range(rounds):
            order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
            for side in order:
                print(f"round {r + 1}/{rounds}: {side} ...", flush=True)
                if side == "plain":
                    plain.append(run_plain(trial, data, args.threads))
                else:
                    ray_runs.append(run_ray(trial, args.threads, tmp / "runs", f"r{r}",
                                            data_dir, tmp / f"ray-{r}.log"))
    finally:
        import ray

        ray.shutdown()
    n = plain[0]["n_train"]

    # Timed epochs: all but the first (warm-up). ratio_wall also drops the last (test eval).
    def timed(run, key, drop_last=False):
        xs = run[key][1:]
        return xs[:-1] if drop_last else xs

    def per_epoch(runs, key, drop_last=False):  # images/s of each timed epoch
        return [n / x for run in runs for x in timed(run, key, drop_last)]

    plain_e, ray_e = per_epoch(plain, "epoch_time_s"), per_epoch(ray_runs, "epoch_time_s")
    plain_w, ray_w = per_epoch(plain, "wall_s", True), per_epoch(ray_runs, "wall_s", True)
    med = {k: common.median(v) for k, v in
           {"plain": plain_e, "ray": ray_e, "plain_wall": plain_w, "ray_wall": ray_w}.items()}
    ratio = med["ray"] / med["plain"]
    ratio_wall = med["ray_wall"] / med["plain_wall"]
    # Total images / total seconds: every epoch weighs in, load spikes included.
    mean_plain = throughput(n, [x for r in plain for x in timed(r, "epoch_time_s")])
    mean_ray = throughput(n, [x for r in ray_runs for x in timed(r, "epoch_time_s")])
    per_round = [common.median(per_epoch([b], "epoch_time_s"))
                 / common.median(per_epoch([a], "epoch_time_s"))
                 for a, b in zip(plain, ray_runs)]
    # What a report + checkpoint adds per epoch on the Ray side.
    extra = [w - e for run in ray_runs for w, e in zip(timed(run, "wall_s", True),
                                                       timed(run, "epoch_time_s", True))]

    def cpu_cores(runs):  # mean over runs: cores used by the driver, workers, Ray's daemons
        keys = ("driver_cores", "worker_cores", "ray_cores")
        return {k: round(sum(r["cpu"][k] for r in runs) / len(runs), 3) for k in keys}

    figures = {
        "what": "one trial: plain cae.train.trainer.Trainer.fit in-process vs the same "
                "TrialConfig as a "
                "one-point FIFO sweep via cae.cli.main(['sweep', ...]); images/s = training "
                "images / epoch_time_s per epoch, first epoch (warm-up) excluded on both "
                "sides; ratio = median Ray epoch / median plain epoch",
        "dataset": dataset, "train_images": n, "model": MODEL, "batch_size": args.batch_size,
        "threads": args.threads, "epochs_timed_per_run": epochs, "rounds": rounds,
        "plain_images_per_s": round(med["plain"], 1), "ray_images_per_s": round(med["ray"], 1),
        "ratio": round(ratio, 4), "goal": ">= 0.95", "met": ratio >= 0.95,
        "ratio_per_round": [round(x, 4) for x in per_round],
        "ratio_mean": round(mean_ray / mean_plain, 4),
        "mean_images_per_s": {"plain": round(mean_plain, 1), "ray": round(mean_ray, 1)},
        "plain_wall_images_per_s": round(med["plain_wall"], 1),
        "ray_wall_images_per_s": round(med["ray_wall"], 1),
        "ratio_wall": round(ratio_wall, 4),
        "ray_report_checkpoint_s_per_epoch": round(common.median(extra), 4) if extra else None,
        "cpu_cores_plain_side": cpu_cores(plain), "cpu_cores_ray_side": cpu_cores(ray_runs),
        "runs": {"plain": plain, "ray": ray_runs},
    }
    out = args.out or common.results_path("overhead", args.quick)
    common.write_results(out, "overhead", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)

    cp, cr = cpu_cores(plain), cpu_cores(ray_runs)
    print()
    print(common.table([
        ("plain PyTorch (Trainer.fit)", med["plain"], 1.0, mean_plain,
         f"{cp['driver_cores']:.2f}/{cp['worker_cores']:.2f}/{cp['ray_cores']:.2f}"),
        ("Ray Tune trial (cae sweep)", med["ray"], ratio, mean_ray,
         f"{cr['driver_cores']:.2f}/{cr['worker_cores']:.2f}/{cr['ray_cores']:.2f}"),
        ("Ray Tune, report+checkpoint incl.", med["ray_wall"], ratio_wall, "", ""),
    ], header=("side", "images/s (median epoch)", "ratio", "images/s (mean)",
               "cores driver/worker/ray")))
    print(f"\n{dataset}: {n:,} training images x {epochs} timed epochs x {rounds} round(s), "
          f"{args.threads} thread(s), batch {args.batch_size}; per-round ratios "
          f"{', '.join(f'{x:.3f}' for x in per_round)}; mean-based ratio "
          f"{mean_ray / mean_plain:.3f}; report+checkpoint "
          f"{figures['ray_report_checkpoint_s_per_epoch']} s/epoch")
    print(f"goal ratio >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'} ({ratio:.3f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

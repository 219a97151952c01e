"""Did a change slow a trial down? ``overhead.py`` on the code of an earlier commit and on
this tree, alternately, in one run.

The earlier commit is checked out in a temporary git worktree; each side runs
``benchmarks/overhead.py --dataset sample`` in a fresh process with ``PYTHONPATH`` on its
own tree (plain ``Trainer.fit`` images/s and the same trial under Ray Tune), in the order
before, after, after, before, ... (ABBA pairs), so that the machine's drift hits both
sides alike. ``ratio_plain`` = the median after / the median before of plain images/s
(1.0: unchanged; above 1: faster after), ``ratio_ray`` the same under Ray Tune; each run's
own figures and load are kept. Then plain ``Trainer.fit`` of overhead.py's trial (6 epochs
on the sample, one thread) alone, ABBA over ``--fit-pairs`` pairs, each in a fresh process:
``ratio_fit`` = the median wall of ``fit`` before / after (above 1: faster after), its
median epoch beside it, and whether both sides ended at the same validation loss to the
bit (``same_losses``). overhead.py's sides share each run's minute with Ray, and a burst
from another process moves a single run; the fit pairs are the steadier figure.

    python benchmarks/beforeafter.py --before 3a44e34            # 4 runs a side
    python benchmarks/beforeafter.py --before 3a44e34 --quick    # 1 run a side, 1 round

Writes ``benchmarks/results/overhead-before-after-REV.json`` (``-quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(common.ROOT), *args], check=True, text=True,
                          capture_output=True).stdout.strip()


def run_side(tree: Path, out: Path, rounds: int, epochs: int) -> dict:
    """``overhead.py`` of ``tree`` on the sample, in a fresh process on that tree's code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "benchmarks" / "overhead.py"), "--dataset", "sample",
           "--rounds", str(rounds), "--epochs", str(epochs), "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    record = json.loads(out.read_text())
    return {"plain_images_per_s": record["plain_images_per_s"],
            "ray_images_per_s": record["ray_images_per_s"],
            "load_avg_start": record["machine"]["load_avg_start"],
            "load_avg_end": record["machine"]["load_avg_end"],
            "date": record["date"], "finished": record["finished"]}


FIT = """
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import overhead
from cae.config.trial import TrialConfig
from cae.data.datasets import load
from cae.train.trainer import Trainer
torch.set_num_threads(1)
cfg = TrialConfig.model_validate(overhead.trial_dict("sample", 6, 128, None))
trainer = Trainer(cfg, load(cfg.data))
t0 = time.perf_counter()
trainer.fit()
wall = time.perf_counter() - t0
epochs = [h["epoch_time_s"] for h in trainer.history][1:]
print(json.dumps({"fit_s": wall, "median_epoch_s": statistics.median(epochs),
                  "last_val_loss": trainer.history[-1]["val_loss"]}))
"""


def fit_side(tree: Path) -> dict:
    """Plain ``Trainer.fit`` of overhead.py's trial on ``tree``'s code, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", FIT, str(tree)], cwd=tree, env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--runs", type=int, help="runs a side (default 4, 1 with --quick)")
    p.add_argument("--fit-pairs", type=int, help="ABBA pairs of plain fit (default 4, 1 "
                   "with --quick)")
    p.add_argument("--quick", action="store_true", help="1 run a side of 1 round")
    args = p.parse_args()
    runs = args.runs or (1 if args.quick else 4)
    rounds, epochs = (1, 2) if args.quick else (3, 5)
    before = git("rev-parse", "--short", args.before)
    after = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    started, info = common.now(), common.machine()
    order = [side for i in range(runs) for side in (("before", "after") if i % 2 == 0
                                                     else ("after", "before"))]
    results: dict[str, list[dict]] = {"before": [], "after": []}
    fits: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        git("worktree", "add", "--detach", str(old), before)
        try:
            for n, side in enumerate(order):
                tree = old if side == "before" else common.ROOT
                got = run_side(tree, Path(tmp) / f"{side}{n}.json", rounds, epochs)
                results[side].append(got)
                print(f"{side:<6} plain {got['plain_images_per_s']:8.1f} images/s, Ray "
                      f"{got['ray_images_per_s']:8.1f}, load {got['load_avg_start'][0]} -> "
                      f"{got['load_avg_end'][0]}", flush=True)
            pairs = args.fit_pairs or (1 if args.quick else 4)
            fit_order = [side for i in range(pairs) for side in (
                ("before", "after", "after", "before") if i % 2 == 0 else
                ("after", "before", "before", "after"))][:2 * pairs]
            for side in fit_order:
                got = fit_side(old if side == "before" else common.ROOT)
                fits[side].append(got)
                print(f"{side:<6} fit {got['fit_s']:.3f} s, median epoch "
                      f"{got['median_epoch_s']:.4f} s", flush=True)
        finally:
            git("worktree", "remove", "--force", str(old))
    median = {side: {k: statistics.median(r[k] for r in rs)
                     for k in ("plain_images_per_s", "ray_images_per_s")}
              for side, rs in results.items()}
    figures = {"before": before, "after": after, "after_has_uncommitted_changes": dirty,
               "order": order, "rounds": rounds, "epochs": epochs, "runs": results,
               "median": median,
               "ratio_plain": median["after"]["plain_images_per_s"]
               / median["before"]["plain_images_per_s"],
               "ratio_ray": median["after"]["ray_images_per_s"]
               / median["before"]["ray_images_per_s"],
               "fit_order": fit_order, "fits": fits,
               "ratio_fit": statistics.median(f["fit_s"] for f in fits["before"])
               / statistics.median(f["fit_s"] for f in fits["after"]),
               "ratio_fit_epoch": statistics.median(f["median_epoch_s"] for f in fits["before"])
               / statistics.median(f["median_epoch_s"] for f in fits["after"]),
               "same_losses": len({f["last_val_loss"] for fs in fits.values() for f in fs}) == 1}
    path = common.results_path(f"overhead-before-after-{before}", args.quick)
    common.write_results(path, "overhead-before-after", info, figures, started)
    print(f"overhead.py after/before: plain {figures['ratio_plain']:.3f}, Ray Tune "
          f"{figures['ratio_ray']:.3f}; plain fit before/after {figures['ratio_fit']:.3f} "
          f"(epochs {figures['ratio_fit_epoch']:.3f}), same losses: {figures['same_losses']}; "
          f"results in {path}")


if __name__ == "__main__":
    main()

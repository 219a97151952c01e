"""Did a change slow a trial down? ``overhead.py`` on the code of an earlier commit and on
this tree, alternately, in one run.

The earlier commit is checked out in a temporary git worktree; each side runs
``benchmarks/overhead.py --dataset sample`` in a fresh process with ``PYTHONPATH`` on its
own tree (plain ``Trainer.fit`` images/s and the same trial under Ray Tune), in the order
before, after, after, before, ... (ABBA pairs), so that the machine's drift hits both
sides alike. ``ratio_plain`` = the median after / the median before of plain images/s
(1.0: unchanged; above 1: faster after), ``ratio_ray`` the same under Ray Tune; each run's
own figures and load are kept.

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--runs", type=int, help="runs a side (default 4, 1 with --quick)")
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
               / median["before"]["ray_images_per_s"]}
    path = common.results_path(f"overhead-before-after-{before}", args.quick)
    common.write_results(path, "overhead-before-after", info, figures, started)
    print(f"plain after/before {figures['ratio_plain']:.3f}, Ray Tune "
          f"{figures['ratio_ray']:.3f}; results in {path}")


if __name__ == "__main__":
    main()

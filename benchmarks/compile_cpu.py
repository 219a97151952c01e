"""``compile: default`` against ``compile: none`` for the quickstart's trials on this CPU:
does inductor make a whole trial faster, its compilation included?

Each trial runs as a sweep runs it: in a fresh process (a Ray worker's), on one thread
(``resources.cpu: 1``), the quickstart's base trial (the embedded sample, batch 128, 12
epochs; patience off so both sides train every epoch) with one of the quickstart grid's
architectures. Three sides per architecture, eager first for one architecture and last for the
next, so that a change in the machine's load hits all of them:

- ``none``: eager;
- ``cold``: compiled, with an empty inductor cache (what every trial of a first sweep on a
  machine pays: the quickstart's 16 points are 16 architectures);
- ``warm``: compiled again with the cache ``cold`` left (a repeat, a resumed or second
  sweep): dynamo still traces, inductor loads its kernels from disk.

Figures per trial: ``trial_s`` (``Trainer.fit`` and ``test`` in the process, compilation
included), ``process_s`` (the whole process: Python's start and the imports too),
``compile_s`` (from torch._dynamo's records, ``common.CompileCounts``), ``epoch_s``
(median of epochs 2-12, compile excluded). Ratios: ``trial_speedup`` = none's trial_s / the
compiled side's (>= 1.15 would let ``compile: auto`` compile on a CPU), ``epoch_speedup``
the same for the steady epochs. The load average is recorded before and after every trial.

    python benchmarks/compile_cpu.py            # 2 architectures (latent 8), 3 sides each
    python benchmarks/compile_cpu.py --quick    # 1 architecture, 6 epochs

Writes ``benchmarks/results/compile-cpu.json`` (``compile-cpu-quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

SIDES = ("none", "cold", "warm")
THRESHOLD = 1.15  # the whole-trial speed-up that would make compiling the CPU default


def quickstart_trials(quick: bool) -> list[dict]:
    """The quickstart's base trial, patience off (every trial runs ``max_epochs``), with the
    smallest and the largest architecture of its grid at latent 8 (channels x convs: the
    first and the last; ``quick``: the first alone, 6 epochs)."""
    import yaml

    spec = yaml.safe_load((common.ROOT / "sweeps" / "quickstart.yaml").read_text())
    base = spec["trial"] | {"patience": None, "device": "cpu"}
    if quick:
        base["max_epochs"] = 6
    archs = [(ch, convs) for ch in spec["space"]["model.channels"]["grid"]
             for convs in spec["space"]["model.convs"]["grid"]]
    archs = archs[:1] if quick else [archs[0], archs[-1]]
    return [base | {"model": base["model"] | {"channels": ch, "convs": convs, "latent_dim": 8}}
            for ch, convs in archs]


def trial(spec: str) -> int:
    """In the child process: one trial, timed; one JSON line."""
    job = json.loads(spec)
    import torch

    torch.set_num_threads(1)
    from cae.config.trial import TrialConfig
    from cae.data.datasets import load
    from cae.train.trainer import Trainer

    cfg = TrialConfig.model_validate(job["trial"])
    data = load(cfg.data)
    counts = common.CompileCounts()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, data)
    trainer.fit()
    trainer.test()
    trial_s = time.perf_counter() - t0
    c = counts.now()
    epochs = [h["epoch_time_s"] for h in trainer.history]
    print(json.dumps({"trial_s": round(trial_s, 3), "epochs": len(epochs),
                      "first_epoch_s": round(epochs[0], 3),
                      "epoch_s": round(common.median(epochs[1:]), 4),
                      "compile_s": c["compile_s"], "compiles": c["compiles"],
                      "graph_breaks": c["graph_breaks"],
                      "best_val_loss": round(trainer.best_val, 6)}))
    return 0


def run_side(cfg: dict, side: str, cache: Path) -> dict:
    job = {"trial": cfg | {"compile": "none" if side == "none" else "default"}}
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    load0 = os.getloadavg()[0]
    wall, proc = common.run_timed([sys.executable, __file__, "--trial", json.dumps(job)],
                                  env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} trial failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out | {"process_s": round(wall, 2),
                  "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 architecture, 6 epochs")
    p.add_argument("--out", type=Path)
    p.add_argument("--trial", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trial:
        return trial(args.trial)
    started, info = common.now(), common.machine()
    rows = []
    for i, cfg in enumerate(quickstart_trials(args.quick)):
        order = SIDES if i % 2 == 0 else SIDES[1:] + SIDES[:1]  # warm follows cold (its cache)
        cache = Path(tempfile.mkdtemp(prefix="cae-compile-cpu-"))
        row = {"channels": cfg["model"]["channels"], "convs": cfg["model"]["convs"],
               "order": list(order)}
        for side in order:
            print(f"{row['channels']} x{row['convs']}: {side} ...", flush=True)
            row[side] = run_side(cfg, side, cache)
        for side in ("cold", "warm"):
            row[f"trial_speedup_{side}"] = round(row["none"]["trial_s"] / row[side]["trial_s"], 3)
            row[f"epoch_speedup_{side}"] = round(row["none"]["epoch_s"] / row[side]["epoch_s"], 3)
        rows.append(row)
        shutil.rmtree(cache, ignore_errors=True)
    loads = [x for r in rows for s in SIDES for x in r[s]["load"]]
    figures = {
        "what": __doc__.split("\n\n")[0], "quick": args.quick, "threshold": THRESHOLD,
        "epochs": quickstart_trials(args.quick)[0]["max_epochs"], "rows": rows,
        "load_max": max(loads), "load_above_2": max(loads) > 2}
    for side in ("cold", "warm"):
        for what in ("trial", "epoch"):
            figures[f"{what}_speedup_{side}"] = round(common.median(
                [r[f"{what}_speedup_{side}"] for r in rows]), 3)
    figures["compile_pays"] = figures["trial_speedup_cold"] >= THRESHOLD
    out = args.out or common.results_path("compile-cpu", args.quick)
    common.write_results(out, "compile_cpu", info, figures, started)
    print(common.table(
        [(f"{r['channels']} x{r['convs']}", r["none"]["trial_s"], r["cold"]["trial_s"],
          r["warm"]["trial_s"], r["cold"]["compile_s"], r["warm"]["compile_s"],
          r["trial_speedup_cold"], r["trial_speedup_warm"], r["epoch_speedup_warm"])
         for r in rows],
        ("architecture", "none s", "cold s", "warm s", "compile cold", "compile warm",
         "x cold", "x warm", "x epoch")))
    print(json.dumps({k: v for k, v in figures.items() if k not in ("rows", "what")}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

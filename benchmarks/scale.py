"""The driver at scale: dry run of a 10,000-point grid, export and report of 1,000 trials.

Three timings, each a subprocess (wall time, Python start and imports included), the
median of ``--repeats``:

- ``cae sweep SPEC --dry-run`` of a 10,000-point grid (kernel x channels x convs x latent x
  variant x batch size on fashion_mnist), every point validated; goal < 5 s. Baseline in the
  same run: the 16-point quickstart's dry run (what start-up and imports cost).
- ``cae export RUN_DIR`` of 1,000 trials x 50 epochs; goal < 5 s.
- ``cae report RUN_DIR`` of the same run; goal: the page under 15 MB. Also its build time.

The run directory is SYNTHETIC: a timing input, not results. It is written in Ray Tune's
on-disk layout as a real ``cae sweep`` leaves it (spec.yaml; experiment_state-*.json whose
``trial_data`` holds [trial JSON, runtime metadata JSON] pairs of realistic size; per trial
params.json and result.json with our metrics and Ray's bookkeeping fields per epoch, the
last line with the test errors and stop reason), for a denoise sweep of 1,000 grid points
run to 50 epochs each. It has no checkpoints, so the report's pictures section says so
instead of drawing pictures (27 small PNGs in a real report, whatever the sweep's size).

    python benchmarks/scale.py            # 10,000-point dry run; 1,000 trials x 50 epochs
    python benchmarks/scale.py --quick    # 200 trials x 20 epochs, one repeat

Writes ``benchmarks/results/scale.json`` (``scale-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

from cae.config.catalog import DISTORTIONS  # noqa: E402

VARIANTS = [{}, {"model.batchnorm": True}, {"model.dropout": 0.2},
            {"model.decoder": "conv_transpose"}, {"model.activation": "gelu"}]
CHANNELS = [[4, 8], [8, 16], [16, 32], [32, 64], [8, 16, 32]]

# 4 x 5 x 4 x 5 x 5 x 5 = 10,000 grid points, every one a valid architecture.
GRID_10K = {
    "name": "scale10k",
    "trial": {"data": {"dataset": "fashion_mnist"}, "task": {"name": "reconstruct"},
              "model": {"channels": [8, 16], "bottleneck": "dense", "dense": [64],
                        "latent_dim": 8}, "max_epochs": 50},
    "space": {
        "model.kernel": {"grid": [1, 3, 5, 7]},
        "model.channels": {"grid": CHANNELS},
        "model.convs": {"grid": [1, 2, 3, 4]},
        "model.latent_dim": {"grid": [4, 8, 16, 32, 64]},
        "variant": {"grid": VARIANTS},
        "batch_size": {"grid": [32, 64, 128, 256, 512]},
    },
    "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 3},
    "resources": {"cpu": 1, "gpu": 0},
}

# The synthetic run's sweep: 10 x 5 x 4 x 5 = 1,000 grid points, denoise, 50 epochs.
RUN_SPEC = {
    "name": "scale1k",
    "trial": {"data": {"dataset": "fashion_mnist"}, "task": {"name": "denoise"},
              "model": {"channels": [8, 16], "bottleneck": "dense", "dense": [64],
                        "latent_dim": 8}, "lr": 0.001, "batch_size": 128, "max_epochs": 50,
              "patience": None},
    "space": {
        "model.latent_dim": {"grid": [3, 4, 5, 6, 8, 12, 16, 32, 64, 128]},
        "model.channels": {"grid": CHANNELS},
        "model.convs": {"grid": [1, 2, 3, 4]},
        "variant": {"grid": VARIANTS},
    },
    "scheduler": {"kind": "fifo", "max_t": None, "grace_period": 1, "reduction_factor": 3.0},
    "resources": {"cpu": 1.0, "gpu": 0.25},
    "num_samples": 1, "max_concurrent": None, "max_failures": 1, "storage": "runs",
}


def _hex(n: int, rng: random.Random) -> str:
    """Filler of the size of Ray's cloudpickled hex blobs in the experiment state."""
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _tag(i: int, point: dict) -> str:
    parts = []
    for k, v in sorted(point.items()):
        v = "_".join(map(str, v)) if isinstance(v, list) else (
            ",".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v)
        parts.append(f"{k.replace('.', '_')}={v}")
    return f"{i}_" + ",".join(parts)[:100]


def synthesize_run(run_dir: Path, n_trials: int, n_epochs: int, seed: int = 0) -> dict:
    """Write a SYNTHETIC run directory in Ray Tune's layout (see the module doc)."""
    import itertools

    import yaml

    from cae.config.points import trial_config
    from cae.model.plan import describe

    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(RUN_SPEC, sort_keys=False))
    space = RUN_SPEC["space"]
    keys = list(space)
    points = [dict(zip(keys, c)) for c in itertools.product(*(space[k]["grid"] for k in keys))]
    points = points[:n_trials]
    exp, session = "a1b2c", "2026-11-22_04-05-28"
    start = datetime(2026, 11, 22, 4, 5, 28)
    node = _hex(56, rng)
    blob = {"storage": _hex(1420, rng), "pgf": _hex(352, rng), "steps": _hex(70, rng),
            "ckpt": _hex(4540, rng)}
    trial_data = []
    bytes_written = 0
    for i, point in enumerate(points):
        trial_id = f"{exp}_{i:05d}"
        tag = _tag(i, point)
        logdir = f"run_trial_{trial_id}_{tag}_{session}"
        d = run_dir / logdir
        d.mkdir()
        (d / "params.json").write_text(json.dumps(point, indent=2, sort_keys=True))
        facts = describe(trial_config(RUN_SPEC["trial"], point).model)
        quality = 0.02 + 0.3 / math.sqrt(facts["latent_size"]) * rng.uniform(0.8, 1.2)
        t_epoch = 2.0 + facts["params"] / 2e5 * rng.uniform(0.9, 1.1)
        lines, best, total = [], math.inf, 0.0
        for e in range(1, n_epochs + 1):
            train = quality * (1 + 2.0 / e) * rng.uniform(0.98, 1.02)
            val = quality * (1 + 1.8 / e) * rng.uniform(0.97, 1.03)
            best = min(best, val)
            dt = t_epoch * rng.uniform(0.95, 1.05)
            total += dt + 0.05
            row = {"epoch": e, "train_loss": train, "val_loss": val,
                   **{f"val_loss_{k}": val * rng.uniform(0.6, 1.6) for k in DISTORTIONS},
                   "best_val_loss": best, "epoch_time_s": dt}
            if e == n_epochs:
                row["stop_reason"] = "max_epochs"
            row.update({"params": facts["params"], "latent_size": facts["latent_size"],
                        "device": "cuda:0", "node_id": node})
            if e == n_epochs:
                row["test_loss"] = best * rng.uniform(1.0, 1.05)
                row.update({f"test_loss_{k}": row["test_loss"] * rng.uniform(0.6, 1.6)
                            for k in DISTORTIONS})
            now = start + timedelta(seconds=total)
            row.update({
                "timestamp": int(now.timestamp()), "checkpoint_dir_name":
                f"checkpoint_{e - 1:06d}", "should_checkpoint": True, "done": e == n_epochs,
                "training_iteration": e, "trial_id": trial_id,
                "date": now.strftime("%Y-%m-%d_%H-%M-%S"), "time_this_iter_s": dt + 0.05,
                "time_total_s": total, "pid": 20000 + i % 64, "hostname": "gpu-worker-3",
                "node_ip": "10.0.0.7", "config": point, "time_since_restore": total,
                "iterations_since_restore": e})
            lines.append(json.dumps(row))
        text = "\n".join(lines) + "\n"
        (d / "result.json").write_text(text)
        bytes_written += len(text)
        last = json.loads(lines[-1])
        trial_json = {
            "stub": False, "trainable_name": "run_trial", "trial_id": trial_id,
            "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob["storage"]},
            "config": point, "_Trial__unresolved_config": point, "evaluated_params": point,
            "experiment_tag": tag, "stopping_criterion": {}, "_setup_default_resource": True,
            "_default_placement_group_factory": "80054e2e",
            "placement_group_factory": blob["pgf"], "log_to_file": [None, None],
            "max_failures": 1, "_default_result_or_future": None, "export_formats": [],
            "status": "TERMINATED", "relative_logdir": logdir, "trial_name_creator": None,
            "trial_dirname_creator": None, "custom_trial_name": None, "custom_dirname": None,
            "restore_path": None, "_restore_checkpoint_result": None, "_state_json": None,
            "results": "80054e2e", "extra_arg": "80054e2e", "_resources": "80054e2e"}
        metrics = [k for k, v in last.items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)]
        meta = {
            "start_time": start.timestamp(), "num_failures": 0,
            "num_failures_after_restore": 0, "error_filename": None,
            "pickled_error_filename": None, "last_result": last,
            "last_result_time": start.timestamp() + total,
            "metric_analysis": {m: {s: last[m] for s in ("max", "min", "avg", "last",
                                                         "last-5-avg", "last-10-avg")}
                                for m in metrics},
            "_n_steps": [5, 10],
            "metric_n_steps": {m: {n: {"_type": "CLOUDPICKLE_FALLBACK", "value": blob["steps"]}
                                   for n in ("5", "10")} for m in metrics},
            "checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob["ckpt"]}}
        trial_data.append([json.dumps(trial_json), json.dumps(meta)])
    state = {"trial_data": trial_data,
             "runner_data": {"_metric": "val_loss", "_session_str": session,
                             "_start_time": start.timestamp(), "_resumed": False},
             "stats": {"start_time": start.timestamp()}}
    state_text = json.dumps(state)
    (run_dir / f"experiment_state-{session}.json").write_text(state_text)
    return {"trials": len(points), "epochs": n_epochs, "result_json_bytes": bytes_written,
            "experiment_state_bytes": len(state_text)}


def cae_cmd() -> list[str]:
    """``python -m cae.cli`` run from the repository root: the code of this checkout (the
    ``cae`` console script may point at another install), the same start-up work."""
    return common.cae_command()


def timed(cmd: list[str], repeats: int, before=None) -> tuple[list[float], str]:
    times, out = [], ""
    for _ in range(repeats):
        if before:
            before()
        t, proc = common.run_timed(cmd)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        times.append(t)
        out = proc.stdout
    return times, out


def profile_top(cmd_args: list[str], n: int = 18) -> str:
    """``python -m cProfile -s cumulative`` of a command: its top ``n`` lines."""
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-s", "cumulative", *cmd_args],
                          check=False, capture_output=True, text=True, cwd=common.ROOT)
    lines = proc.stdout.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
    return "\n".join(lines[max(0, start - 3):start + n])


def import_seconds(module: str) -> float:
    t, _ = common.run_timed([sys.executable, "-c", f"import {module}"])
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 trials x 20 epochs, one repeat")
    p.add_argument("--trials", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--repeats", type=int, help="timings per command (default 3, 1 --quick)")
    p.add_argument("--out", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (prints its path)")
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()
    n_trials = args.trials or (200 if args.quick else 1000)
    n_epochs = args.epochs or (20 if args.quick else 50)
    repeats = args.repeats or (1 if args.quick else 3)
    tmp = common.tempdir("scale")
    import yaml

    # 1. the dry run of 10,000 grid points, against the 16-point quickstart's.
    spec = tmp / "grid10k.yaml"
    spec.write_text(yaml.safe_dump(GRID_10K, sort_keys=False))
    print("dry run of the 10,000-point grid ...", flush=True)
    base_t, _ = timed(cae_cmd() + ["sweep", str(common.ROOT / "sweeps" / "quickstart.yaml"),
                                   "--dry-run"], repeats)
    dry_t, dry_out = timed(cae_cmd() + ["sweep", str(spec), "--dry-run"], repeats)
    first = dry_out.splitlines()[:2]
    n_arch = next((int(s.split(":")[1]) for s in first if s.startswith("distinct arch")), None)
    # In-process, the same work without Python start and imports, with a profile.
    import cProfile
    import io
    import pstats

    from cae.config.spec import load_spec
    from cae.sweep import dryrun, plan

    t0 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    checked = plan.check_spec(load_spec(str(spec)))
    t1 = time.perf_counter()
    dryrun.summarize(checked)
    prof.disable()
    t2 = time.perf_counter()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).strip_dirs().sort_stats("cumulative").print_stats(14)
    dry_profile = "\n".join(ln for ln in s.getvalue().splitlines()[6:] if ln.strip())

    # 2. export and 3. report of a synthetic run.
    run_dir = tmp / "run"
    print(f"writing a SYNTHETIC run of {n_trials:,} trials x {n_epochs} epochs ...", flush=True)
    t0s = time.perf_counter()
    synth = synthesize_run(run_dir, n_trials, n_epochs)
    synth["write_s"] = round(time.perf_counter() - t0s, 2)
    dir_bytes = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    print("cae export ...", flush=True)
    exp_t, _ = timed(cae_cmd() + ["export", str(run_dir)], repeats)
    import pandas as pd

    exp_profile = profile_top(["-m", "cae.cli", "export", str(run_dir)])
    imports = {m: round(import_seconds(m), 3) for m in
               ("cae.config.trial, cae.model.plan", "cae.results.tables",
                "cae.sweep.trainable", "torch", "ray.tune")}
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(trials) == n_trials and len(epochs) == n_trials * n_epochs, (len(trials),
                                                                            len(epochs))
    report_html = run_dir / "report.html"
    report_cmd, how = cae_cmd() + ["report", str(run_dir)], "cae report RUN_DIR"
    print(f"{how} ...", flush=True)
    rep_t, _ = timed(report_cmd, repeats,
                     before=lambda: report_html.unlink(missing_ok=True))
    size = report_html.stat().st_size

    med = {"dry_run_s": common.median(dry_t), "dry_run_baseline_s": common.median(base_t),
           "export_s": common.median(exp_t), "report_s": common.median(rep_t)}
    goals = {"dry_run": med["dry_run_s"] < 5, "export": med["export_s"] < 5,
             "report_size": size < 15e6}
    figures = {
        "what": "subprocess wall times (Python start included), median of repeats; the run "
                "directory for export/report is SYNTHETIC (timing input, not results)",
        "repeats": repeats,
        "dry_run": {"grid_points": 10000, "distinct_architectures": n_arch,
                    "spec": GRID_10K, "seconds": [round(x, 3) for x in dry_t],
                    "median_s": round(med["dry_run_s"], 3),
                    "baseline_quickstart_16_points_s": round(med["dry_run_baseline_s"], 3),
                    "in_process_check_spec_s": round(t1 - t0, 3),
                    "in_process_summarize_s": round(t2 - t1, 3),
                    "goal": "< 5 s", "met": goals["dry_run"], "profile_top": dry_profile},
        "synthetic_run": {**synth, "dir_bytes": dir_bytes, "task": "denoise",
                          "note": "SYNTHETIC timing input, not results; no checkpoints"},
        "export": {"seconds": [round(x, 3) for x in exp_t], "median_s": round(med["export_s"], 3),
                   "trials_rows": len(trials), "epochs_rows": len(epochs),
                   "goal": "< 5 s", "met": goals["export"],
                   "import_s": imports, "profile_top": exp_profile},
        "report": {"command": how, "seconds": [round(x, 3) for x in rep_t],
                   "median_s": round(med["report_s"], 3), "size_bytes": size,
                   "size_mb": round(size / 1e6, 2), "goal": "< 15 MB",
                   "met": goals["report_size"]},
        "met": all(goals.values()),
    }
    out = args.out or common.results_path("scale", args.quick)
    common.write_results(out, "scale", info, figures, started)
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(common.table([
        ("cae sweep --dry-run, 16 points (baseline)", f"{med['dry_run_baseline_s']:.2f} s", "",
         ""),
        (f"cae sweep --dry-run, 10,000 points ({n_arch} archs)", f"{med['dry_run_s']:.2f} s",
         "< 5 s", "met" if goals["dry_run"] else "NOT met"),
        (f"cae export, {n_trials:,} x {n_epochs} (SYNTHETIC)", f"{med['export_s']:.2f} s",
         "< 5 s", "met" if goals["export"] else "NOT met"),
        (f"report, {n_trials:,} x {n_epochs} (SYNTHETIC)", f"{med['report_s']:.2f} s", "", ""),
        ("report size", f"{size / 1e6:.2f} MB", "< 15 MB",
         "met" if goals["report_size"] else "NOT met"),
    ], header=("what", "median", "goal", "verdict")))
    print(f"\nreport via {how}; {repeats} repeat(s); run dir {dir_bytes / 1e6:.1f} MB "
          f"(experiment state {synth['experiment_state_bytes'] / 1e6:.1f} MB)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Schedulers on 2 to 1,024 workers, by simulation: FIFO, ASHA, SHA per stratum, and the
default (SHA that keeps workers busy).

The project's real searcher and schedulers run against a simulated controller and clock
(``benchmarks/simulator.py``). Two kinds of input:

- a recorded run (``benchmarks/schedtrace.py``: the quickstart, the peer grid): replayed
  with its own per-epoch times and losses on the workers it had, the costs around the
  epochs measured from its trace; the simulated wall time is checked against the measured
  one, and the decisions (each trial's epochs) against the real ones;
- synthetic grids drawn from the peer grid's FIFO run (all 16 architectures to 9 epochs):
  N trials = the 16 points x N/16 repeats (4 strata: the latent sizes); a repeat's epoch
  times are its architecture's, scaled by the spread measured between that architecture's
  epochs; its curve is its architecture's, scaled by a factor drawn per repeat (the spread
  between two seeds of the quickstart under FIFO) and per epoch.

Figures per scheduler, trials and workers: wall time, utilisation (worker-seconds held by
trials / workers x wall), the share of that spent on epochs that do not count, trial-epochs,
and whether each stratum's winner and best validation loss equal FIFO's and SHA's.

    python benchmarks/schedsim.py            # validation, the sweep over workers, figure
    python benchmarks/schedsim.py --quick    # fewer points (a smoke run)
    python benchmarks/schedsim.py --packs    # fused packs (benchmarks/packsim.py)

Writes ``benchmarks/results/schedsim.json`` and ``docs/schedsim.png``; with ``--packs``
``benchmarks/results/schedsim-packs.json`` and ``docs/packsim.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)
import simulator as sim

# ---- recorded runs ----------------------------------------------------------------------


def load_trace(name: str) -> dict:
    return json.loads((common.RESULTS / f"schedtrace-{name}.json").read_text())


def _spec(spec: dict):
    from cae.config.spec import SweepSpec

    return SweepSpec.model_validate(spec)


def segments(trace: dict) -> list[dict]:
    """Each stretch a trial ran on a worker: its start time and its results in order."""
    open_: dict[str, dict] = {}
    out = []
    for t, kind, trial_id, extra in trace["events"]:
        if kind == "start":
            seg = open_[trial_id] = {"trial": trial_id, "start": t, "results": []}
            out.append(seg)
        elif kind == "result" and trial_id in open_:
            open_[trial_id]["results"].append((t, extra))
    return out


def measure_costs(trace: dict, workers: int) -> sim.Costs:
    """The costs around the epochs, medians over the trace (``simulator.Costs``)."""
    segs = segments(trace)
    result_s, final_s, first = [], [], []
    for seg in segs:
        prev = seg["start"]
        for i, (t, r) in enumerate(seg["results"]):
            extra = t - prev - r.get("epoch_time_s", 0.0)
            if i == 0:
                first.append((seg["start"], extra, "stop_reason" in r))
            elif "stop_reason" in r:
                final_s.append(extra)
            else:
                result_s.append(extra)
            prev = t
    med = statistics.median
    result = med(result_s) if result_s else 0.0
    final = max(0.0, med(final_s) - result) if final_s else 0.0
    first.sort()
    fresh = [x - result for _, x, _ in first[:workers]]
    later = [x - result for _, x, last in first[workers:] if not last]
    # a worker freed when a trial paused, stopped or ended after its last result
    releases = sorted(seg["results"][-1][0] for seg in segs if seg["results"])
    starts = sorted(seg["start"] for seg in segs)[workers:]
    handover = [s - max((r for r in releases if r <= s), default=s) for s in starts]
    events = trace["events"]
    return sim.Costs(
        boot_s=events[0][0] if events else 0.0,
        new_worker_s=max(0.0, med(fresh)) if fresh else 0.0,
        segment_s=max(0.0, med(later)) if later else 0.0,
        result_s=max(0.0, result), final_s=final,
        handover_s=max(0.0, med(handover)) if handover else 0.0,
        tail_s=max(0.0, trace["wall_fit_s"] - events[-1][0]) if events else 0.0,
    )


def recorded_work(trace: dict) -> dict[str, sim.Work]:
    """Each recorded trial's epochs, by config key; a trial the scheduler stopped has no
    own end (the simulation may not run it further)."""
    rows: dict[str, dict[int, dict]] = {}
    for _, kind, trial_id, extra in trace["events"]:
        if kind == "result" and extra and "epoch" in extra:
            rows.setdefault(trial_id, {})[int(extra["epoch"])] = extra
    out = {}
    for trial_id, by_epoch in rows.items():
        epochs = [by_epoch[e] for e in sorted(by_epoch)]
        out[sim.config_key(trace["configs"][trial_id])] = sim.Work(
            tuple(r["val_loss"] for r in epochs), tuple(r["epoch_time_s"] for r in epochs),
            epochs[-1].get("stop_reason", ""))
    return out


def recorded_epochs(trace: dict) -> dict[str, int]:
    """Each trial's epochs trained in the recorded run, by config key."""
    work = recorded_work(trace)
    return {k: len(w.val_loss) for k, w in work.items()}


def workers_of(trace: dict) -> int:
    """How many trials ran at once in the recorded run (its workers)."""
    running, most = set(), 0
    for seg in sorted(segments(trace), key=lambda s: s["start"]):
        end = seg["results"][-1][0] if seg["results"] else seg["start"]
        running = {e for e in running if e > seg["start"]} | {end}
        most = max(most, len(running))
    return most


def replay(trace: dict, spec_changes: dict | None = None) -> dict:
    """The recorded run, simulated: its wall time against the measured one, its decisions
    against the real ones."""
    spec = dict(trace["spec"])
    # a trace recorded before work_ahead existed ran without it
    spec["scheduler"] = {"work_ahead": False, **spec["scheduler"]}
    spec = _spec({**spec, **(spec_changes or {})})
    workers = workers_of(trace)
    costs = measure_costs(trace, workers)
    work = recorded_work(trace)
    out = sim.simulate(spec, lambda c: work[sim.config_key(c)], workers, costs)
    real, simulated = recorded_epochs(trace), sim.stopped_at(out)
    return {
        "trace": trace["name"], "workers": workers, "costs": vars(costs),
        "measured_wall_s": trace["wall_fit_s"], "simulated_wall_s": round(out.wall_s, 2),
        "wall_error": round(out.wall_s / trace["wall_fit_s"] - 1, 4),
        "simulated_utilisation": round(out.utilisation, 4),
        "same_decisions": real == simulated,
        "trial_epochs": {"measured": sum(real.values()), "simulated": out.trial_epochs},
        "load_avg": trace.get("load_avg"),
    }


# ---- synthetic grids drawn from a recorded run ------------------------------------------


PEER_AXES = ("model.latent_dim", "model.channels", "model.convs")


def point_of(config: dict) -> str:
    """A trial's grid point of the peer grid (its repeat left out)."""
    return json.dumps([config[k] for k in PEER_AXES])


def profile(trace: dict) -> dict[str, dict]:
    """Per grid point of a FIFO run: its curve and its epochs' seconds."""
    work = recorded_work(trace)
    out = {}
    for key, w in work.items():
        out[point_of(json.loads(key))] = {"val_loss": list(w.val_loss),
                                          "seconds": list(w.seconds), "own_end": w.own_end}
    return out


def seed_spread(a: dict, b: dict) -> dict[str, float]:
    """How much a trial's curve moves with its seed, from two FIFO runs that differ only by
    the trials' seed: the spread (standard deviation of the log) of a trial's whole curve
    and of single epochs around it, each run contributing half the variance."""
    import numpy as np

    wa, wb = recorded_work(a), recorded_work(b)
    per_trial, per_epoch = [], []
    for key in wa.keys() & wb.keys():
        n = min(len(wa[key].val_loss), len(wb[key].val_loss))
        logs = np.log(np.array(wb[key].val_loss[:n]) / np.array(wa[key].val_loss[:n]))
        per_trial.append(logs.mean())
        per_epoch.extend(logs - logs.mean())
    trial_sd = float(np.std(per_trial) / np.sqrt(2))
    epoch_sd = float(np.std(per_epoch) / np.sqrt(2))
    return {"trial": round(trial_sd, 4), "epoch": round(epoch_sd, 4), "trials": len(per_trial)}


def time_spread(prof: dict[str, dict]) -> float:
    """The spread (standard deviation of the log) of a grid point's epoch times around its
    median, over all points (the first epoch of each left out: it holds the warm-up)."""
    import numpy as np

    logs = []
    for p in prof.values():
        secs = np.array(p["seconds"][1:])
        logs.extend(np.log(secs / np.median(secs)))
    return float(np.std(logs))


def synthetic_spec(n_trials: int, scheduler: dict, epochs: int = 9):
    """The peer grid with n_trials / 16 repeats of each point."""
    import peer

    spec = peer.grid_spec("/nonexistent", 7000, epochs, scheduler, "auto")
    spec["num_samples"] = max(1, n_trials // 16)
    return _spec(spec)


def synthetic_work(prof: dict[str, dict], spread: dict[str, float], time_sd: float,
                   seed: int = 0):
    """work_of(config) for the synthetic grid: the point's curve scaled per repeat and per
    epoch by the seed spread, its epoch times by the time spread (repeat 0 of a point is
    drawn too, so no trial is the recorded one)."""
    import zlib

    import numpy as np

    def work_of(config: dict) -> sim.Work:
        point = point_of(config)
        base = prof[point]
        key = f"{seed}|{point}|{config.get('repeat', 0)}".encode()
        rng = np.random.default_rng(zlib.crc32(key))
        n = len(base["val_loss"])
        curve = np.array(base["val_loss"]) * np.exp(
            rng.normal(0, spread["trial"]) + rng.normal(0, spread["epoch"], n))
        median_s = float(np.median(base["seconds"][1:]))
        seconds = median_s * np.exp(rng.normal(0, time_sd, n))
        return sim.Work(tuple(map(float, curve)), tuple(map(float, seconds)),
                        base["own_end"] or "max_epochs")

    return work_of


# ---- experiments ------------------------------------------------------------------------

SCHEDULERS = {  # what each simulated sweep runs (work_ahead: cae's default for sha)
    "fifo": {"kind": "fifo"},
    "asha": {"kind": "asha", "stratify": ["model.latent_dim"]},
    "sha": {"kind": "sha", "stratify": ["model.latent_dim"], "work_ahead": False},
    "default": {"kind": "sha", "stratify": ["model.latent_dim"], "work_ahead": True},
}
WORKERS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def run_point(n_trials: int, workers: int, name: str, work_of, costs: sim.Costs) -> dict:
    """One simulated sweep: its figures and each stratum's answer."""
    spec = synthetic_spec(n_trials, SCHEDULERS[name])
    t0 = time.perf_counter()
    out = sim.simulate(spec, work_of, workers, costs)
    return {
        "scheduler": name, "trials": n_trials, "workers": workers,
        "wall_s": round(out.wall_s, 2), "utilisation": round(out.utilisation, 4),
        "wasted_share": round(out.wasted_s / out.busy_s, 4) if out.busy_s else 0.0,
        "trial_epochs": out.trial_epochs, "starts": out.starts,
        "counted_epochs": sum(len(sim.counted_rows(t.rows)) for t in out.trials),
        "util_bound": round(util_bound(out, costs), 4),
        "answers": sim.answers(out, ["model.latent_dim"]),
        "simulated_in_s": round(time.perf_counter() - t0, 2),
    }


def util_bound(out: sim.Outcome, costs: sim.Costs) -> float:
    """The most utilisation a schedule of the same counted work could reach: that work
    spread over the workers, but never in less time than the longest trial's own chain of
    epochs (its epochs run one after the other)."""
    useful = out.busy_s - out.wasted_s
    chain = max(sum(out.trials[i].work.seconds[:len(sim.counted_rows(t.rows))])
                + len(sim.counted_rows(t.rows)) * costs.result_s
                for i, t in enumerate(out.trials))
    return useful / (out.workers * max(chain, useful / out.workers))


def same_answer(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and math.isclose(
        a[k][1], b[k][1], rel_tol=1e-12) for k in a)


def sweep_points(trials: list[int], workers: list[int], work_of, costs: sim.Costs) -> list:
    rows = []
    for n in trials:
        for w in workers:
            point = {name: run_point(n, w, name, work_of, costs) for name in SCHEDULERS}
            for r in point.values():
                r["answer_matches_fifo"] = same_answer(r["answers"], point["fifo"]["answers"])
                r["answer_matches_sha"] = same_answer(r["answers"], point["sha"]["answers"])
                r["worst_gap_vs_fifo"] = round(max(
                    r["answers"][k][1] / point["fifo"]["answers"][k][1] - 1
                    for k in point["fifo"]["answers"]), 5)
            rows += point.values()
            print(f"{n:>6} trials {w:>5} workers: " + ", ".join(
                f"{k} {r['wall_s']:.0f} s {r['utilisation']:.0%}" for k, r in point.items()),
                flush=True)
    return rows


def goals(rows: list[dict], n: int, w: int) -> dict:
    at = {r["scheduler"]: r for r in rows if r["trials"] == n and r["workers"] == w}
    d = at["default"]
    return {"trials": n, "workers": w, "util": d["utilisation"], "util_bound": d["util_bound"],
            "wall_vs_asha": round(d["wall_s"] / at["asha"]["wall_s"], 4),
            "wall_vs_sha": round(d["wall_s"] / at["sha"]["wall_s"], 4),
            "answer_matches": d["answer_matches_sha"],
            "sha_util": at["sha"]["utilisation"], "asha_util": at["asha"]["utilisation"]}


NEVER_WORSE = ((16, 2), (64, 2), (256, 2), (256, 8), (256, 16), (256, 64), (256, 1024),
               (4096, 64), (4096, 1024))


def never_worse(prof: dict, spread: dict, time_sd: float, costs: sim.Costs, seeds: int,
                points=NEVER_WORSE) -> list[dict]:
    """The default's wall over SHA's (and ASHA's) on fresh draws of the synthetic grid
    (each seed draws other curves and epoch times): the mean and the worst."""
    out = []
    for n, w in points:
        ratios, vs_asha = [], []
        for seed in range(1, (seeds if n < 4096 else 1) + 1):
            work_of = synthetic_work(prof, spread, time_sd, seed=seed)
            r = {name: run_point(n, w, name, work_of, costs) for name in ("sha", "asha",
                                                                        "default")}
            assert same_answer(r["default"]["answers"], r["sha"]["answers"])
            ratios.append(r["default"]["wall_s"] / r["sha"]["wall_s"])
            vs_asha.append(r["default"]["wall_s"] / r["asha"]["wall_s"])
        out.append({"trials": n, "workers": w, "draws": len(ratios),
                    "wall_vs_sha_mean": round(statistics.mean(ratios), 4),
                    "wall_vs_sha_worst": round(max(ratios), 4),
                    "wall_vs_asha_mean": round(statistics.mean(vs_asha), 4)})
        print(f"never worse? {n} trials x {w} workers: default / SHA mean "
              f"{out[-1]['wall_vs_sha_mean']:.3f}, worst {out[-1]['wall_vs_sha_worst']:.3f}",
              flush=True)
    return out


def figure(rows: list[dict], path: Path) -> Path:
    """Wall time and utilisation against workers, for 256 and 4,096 trials."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["trials"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 7), squeeze=False,
                             sharex=True)
    labels = {"fifo": "FIFO", "asha": "ASHA per stratum", "sha": "SHA per stratum",
              "default": "SHA + work ahead (default)"}
    for j, n in enumerate(sizes):
        for name, label in labels.items():
            pts = sorted((r["workers"], r["wall_s"], r["utilisation"]) for r in rows
                         if r["trials"] == n and r["scheduler"] == name)
            xs = [p[0] for p in pts]
            axes[0][j].plot(xs, [p[1] / 3600 for p in pts], marker="o", label=label)
            axes[1][j].plot(xs, [p[2] for p in pts], marker="o", label=label)
        axes[0][j].set_title(f"{n:,} trials (peer grid, 4 strata)")
        axes[0][j].set_yscale("log")
        axes[0][j].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        axes[0][j].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes[0][j].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[0][j].set_ylabel("wall time (hours)")
        axes[1][j].set_ylabel("worker utilisation")
        axes[1][j].set_ylim(0, 1.02)
        axes[1][j].axhline(0.8, color="grey", lw=0.8, ls="--")
        axes[1][j].set_xscale("log", base=2)
        axes[1][j].set_xlabel("workers (one trial each)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer points, no 10,000 trials")
    p.add_argument("--replay", action="append", default=[],
                   help="only replay these recorded runs (trace names) and print them")
    p.add_argument("--figure", action="store_true",
                   help="only draw the figure again from benchmarks/results/schedsim.json")
    p.add_argument("--packs", action="store_true",
                   help="fused packs instead (benchmarks/packsim.py): Study B's grid on 1 and 8 "
                        "GPUs, one trial per GPU under sha, FIFO packs, packs under sha")
    args = p.parse_args(argv)
    if args.packs:
        return packs(args.quick)
    if args.figure:
        rows = json.loads(common.results_path("schedsim", False).read_text())["points"]
        print(f"figure: {figure(rows, common.ROOT / 'docs' / 'schedsim.png')}")
        return 0
    if args.replay:
        for name in args.replay:
            print(json.dumps(replay(load_trace(name)), indent=1))
        return 0
    started, info = common.now(), common.machine()
    validation = [replay(load_trace(name)) for name in TRACES]
    for v in validation:
        print(f"replay {v['trace']}: measured {v['measured_wall_s']:.1f} s, simulated "
              f"{v['simulated_wall_s']:.1f} s ({v['wall_error']:+.1%}), same decisions: "
              f"{v['same_decisions']}")
    fifo = load_trace("peer-fifo")
    prof = profile(fifo)
    spread = seed_spread(load_trace("quickstart-fifo"), load_trace("quickstart-fifo-seed1"))
    time_sd = time_spread(prof)
    costs = measure_costs(load_trace("peer-sha"), workers_of(load_trace("peer-sha")))
    costs = sim.Costs(**{**vars(costs), "boot_s": 0.0, "tail_s": 0.0})
    work_of = synthetic_work(prof, spread, time_sd)
    trials = [256] if args.quick else [256, 4096]
    workers = [2, 64, 1024] if args.quick else list(WORKERS)
    rows = sweep_points(trials, workers, work_of, costs)
    checks = never_worse(prof, spread, time_sd, costs, 2 if args.quick else 4,
                         NEVER_WORSE[:3] if args.quick else NEVER_WORSE)
    scale = [] if args.quick else [run_point(10_000, 1024, name, work_of, costs)
                                   for name in SCHEDULERS]
    for r in scale:
        print(f"10,000 trials x 1,024 workers, {r['scheduler']}: simulated in "
              f"{r['simulated_in_s']:.0f} s")
    g64, g1024 = goals(rows, 256, 64), (goals(rows, 4096, 1024) if not args.quick else None)
    figures = {
        "what": "the project's real searcher and schedulers on a simulated clock "
                "(benchmarks/simulator.py); synthetic grids drawn from the peer grid's FIFO "
                "run (benchmarks/results/schedtrace-peer-fifo.json)",
        "validation": validation,
        "synthetic": {"seed_spread": spread, "epoch_time_spread": round(time_sd, 4),
                      "costs": vars(costs), "profile_from": "peer-fifo"},
        "util_64": g64["util"], "util_bound_64": g64["util_bound"],
        "wall_vs_asha_64": g64["wall_vs_asha"],
        "answer_matches": g64["answer_matches"], "goal_256x64": g64,
        "goal_4096x1024": g1024,
        "goal": "util_64 >= 0.80, wall_vs_asha_64 <= 1.2, answer_matches",
        "never_worse_than_sha": checks,
        "points": [{k: v for k, v in r.items() if k != "answers"} for r in rows],
        "scale_10000x1024": [{k: v for k, v in r.items() if k != "answers"} for r in scale],
    }
    figures["met"] = (g64["util"] >= 0.8 and g64["wall_vs_asha"] <= 1.2
                      and g64["answer_matches"])
    out = common.results_path("schedsim", args.quick)
    common.write_results(out, "schedsim", info, figures, started)
    if not args.quick:
        print(f"figure: {figure(rows, common.ROOT / 'docs' / 'schedsim.png')}")
    print(json.dumps({"goal_256x64": g64, "goal_4096x1024": g1024}, indent=1))
    print(f"wrote {out}")
    return 0


TRACES = ("quickstart-sha", "peer-sha", "quickstart-fifo", "quickstart-fifo-seed1", "peer-fifo")


def packs(quick: bool) -> int:
    """``--packs``: ``packsim.compare`` for Study B's grid as written and with three repeats
    per point (``--quick``: as written, on 8 GPUs), its table, results and figure."""
    import packsim

    started, info = common.now(), common.machine()
    cases = [(1, [8], [2.4])] if quick else [(1, [1, 8], [2.4, 11.5]), (3, [1, 8], [2.4, 11.5])]
    grids = [packsim.compare(n, gpus, saturations) for n, gpus, saturations in cases]
    for g in grids:
        print(f"Study B's grid, {g['trials']:,} trials ({g['num_samples']} per point), "
              f"{g['fifo_packs']:,} FIFO packs:")
        print(packsim.describe_runs(g))
    figures = {"what": packsim.__doc__.split("\n\n")[0].replace("\n", " "),
               "assumptions": {"pack_epoch": "t(K) = t1 * max(1, K / S), S = saturation_members "
                                             "(HFTA's 2.4x-11.5x trials per hour)",
                               "t1": "steps x layers x 3 kernels x 10 us (launch-bound)",
                               "start_s": packsim.START_S, "curves": "drawn, seed 0"},
               "grids": grids}
    out = common.results_path("schedsim-packs", quick)
    common.write_results(out, "schedsim-packs", info, figures, started)
    if not quick:
        print(f"figure: {packsim.figure(grids, common.ROOT / 'docs' / 'packsim.png')}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

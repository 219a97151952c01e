"""Record a real sweep's schedule: when each trial started, reported and ended.

``python benchmarks/schedtrace.py quickstart`` or ``peer`` runs the sweep in this process
the way ``cae sweep`` does (``cae.sweep.tuner.fit``), with one more Tune callback that writes down,
on the driver's clock, every trial start (a new trial, or a paused one resumed), every
result (epoch, validation loss, the trainer's own epoch time, Ray's iteration time) and
every end. The trace, the trials' configs and the fit's wall time go to
``benchmarks/results/schedtrace-NAME.json``; ``benchmarks/schedsim.py`` replays it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)
from ray import tune

RESULT_KEYS = ("epoch", "val_loss", "best_val_loss", "epoch_time_s", "time_this_iter_s",
               "time_total_s", "stop_reason")


class Recorder(tune.Callback):
    """Every trial start, result and end, with ``time.perf_counter()`` since ``t0``."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.events: list[list] = []
        self.configs: dict[str, dict] = {}

    def _add(self, kind: str, trial, **extra) -> None:
        self.events.append([round(time.perf_counter() - self.t0, 4), kind, trial.trial_id,
                            extra or None])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.configs.setdefault(trial.trial_id, dict(trial.config))
        self._add("start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._add("result", trial, **{k: result[k] for k in RESULT_KEYS if k in result})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._add("complete", trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add("error", trial)


def peer_spec(scheduler: dict) -> dict:
    """The peer benchmark's grid (``benchmarks/peer.py``) on a copy of Fashion-MNIST."""
    import peer
    import torchvision

    data = common.writable_data_copy("FashionMNIST", common.tempdir("schedtrace-data"))
    if data is None:
        raise SystemExit("the peer grid needs ../shared/data (Fashion-MNIST)")
    torchvision.datasets.FashionMNIST(str(data), train=True, download=True)  # extract once
    return peer.grid_spec(str(data), 7000, 9, scheduler, "auto")


def record(spec, storage: Path, name: str) -> dict:
    """Run ``spec`` (a SweepSpec) as ``cae sweep`` does, recording its schedule."""
    import os

    from cae.results.tables import export
    from cae.run import directory as rundir
    from cae.sweep import plan, tuner

    started = time.perf_counter()
    checked = plan.check_spec(spec, plan.local_budget(spec))
    datasets = plan.load_datasets(checked)
    run_dir = f"{storage}/{name}"
    load_before = os.getloadavg()
    with tuner.ray_session(None):
        rundir.save_spec(run_dir, spec)
        recorder = Recorder()
        recorder.t0 = t0 = time.perf_counter()
        tuner.fit(spec, datasets, run_dir, checked, [recorder])
        wall = time.perf_counter() - t0
    export(run_dir)
    return {"name": name, "spec": spec.model_dump(mode="json"), "wall_fit_s": round(wall, 3),
            "wall_total_s": round(time.perf_counter() - started, 3),
            "load_avg": [list(load_before), list(os.getloadavg())],
            "run_dir": run_dir, "configs": recorder.configs, "events": recorder.events}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", choices=["quickstart", "peer"])
    p.add_argument("--scheduler", default=None,
                   help="scheduler as JSON (default: the spec's own; peer: sha per latent)")
    p.add_argument("--name", default=None, help="trace name (default: SWEEP-KIND)")
    p.add_argument("--set", action="append", default=[], help="spec overrides (quickstart)")
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()

    import yaml

    from cae.config.spec import load_spec

    tmp = common.tempdir("schedtrace")
    if args.sweep == "quickstart":
        sets = list(args.set) + ([f"scheduler={args.scheduler}"] if args.scheduler else [])
        spec = load_spec(str(common.ROOT / "sweeps" / "quickstart.yaml"), sets)
    else:
        sched = json.loads(args.scheduler) if args.scheduler else {
            "kind": "sha", "stratify": ["model.latent_dim"]}
        path = tmp / "peer.yaml"
        path.write_text(yaml.safe_dump(peer_spec(sched), sort_keys=False))
        spec = load_spec(str(path), args.set)
    name = args.name or f"{args.sweep}-{spec.scheduler.kind}"
    trace = record(spec, tmp, name)
    out = common.RESULTS / f"schedtrace-{name}.json"
    common.write_results(out, "schedtrace", info, trace, started)
    print(f"{name}: fit {trace['wall_fit_s']:.1f} s, total {trace['wall_total_s']:.1f} s; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A run's trials to the trackers its spec (or ``cae track``) names: the one way from the
tables' rows to tracker runs, for a sweep as it runs and for ``cae track`` afterwards.

- :func:`check_packages`: a tracker whose package is missing, one error before Ray starts.
- :class:`SweepTracking`: a sweep's feeds (``cae.track.feed``), one per tracker, opened
  when the sweep starts (the sweep's run with its spec), fed live by
  ``cae.track.callback`` and closed when the run is finished with the tables' rows, the
  tables and the report; what a tracker did not take is left for ``cae track``.
- :func:`track_run`: ``cae track RUN_DIR``: a finished, interrupted or running run's
  tables sent, only what the tracker lacks (run it twice: each epoch is there once).

Nothing here imports Ray: ``cae track`` works where Ray is absent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cae.config.errors import UserError, validate
from cae.config.spec import SweepSpec, TrackingConfig
from cae.run import directory as rundir
from cae.track.feed import RETRY_S, Feed, Runs, Tracker
from cae.track.runs import FINISHED, RUNNING, STOPPED, sweep_run, table_runs

CLOSE_WAIT_S = 60.0  # at the end of a sweep, the longest wait for a tracker
# MLflow's client retries a request 7 times over about 4 minutes by default: while a sweep
# runs, a request gives up sooner (the feed tries again later); a value the user set wins
LIVE_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker -> its package (and cae's extra)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_packages(tracking: TrackingConfig) -> None:
    """A ``UserError`` naming the trackers of ``tracking`` whose package is not installed."""
    missing = [name for name in tracking.named() if importlib.util.find_spec(EXTRAS[name]) is None]
    if missing:
        raise UserError(f"tracking.{missing[0]}: the {' and '.join(missing)} package"
                        f"{'s are' if len(missing) > 1 else ' is'} not installed: "
                        f"pip install 'cae-sweep[{','.join(missing)}]'")


def trackers(tracking: TrackingConfig, run_dir: str, sweep_name: str) -> list[Tracker]:
    """The trackers of ``tracking`` for the run in ``run_dir``: MLflow's experiment defaults
    to the sweep's name, W&B's group to the run directory's, offline W&B runs are written
    under the run directory (its local mirror for a run at a URI)."""
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    out: list[Tracker] = []
    if tracking.mlflow is not None:
        from cae.track.mlflowtracker import MlflowTracker

        out.append(MlflowTracker(tracking.mlflow.uri, tracking.mlflow.experiment or sweep_name,
                                 name))
    if tracking.wandb is not None:
        from cae.track.wandbtracker import WandbTracker

        w = tracking.wandb
        out.append(WandbTracker(w.project, w.entity, w.mode, w.group or name, name,
                                _local(run_dir)))
    return out


def _local(run_dir: str) -> Path:
    """Where a run's files are on this machine (a run at a URI: its mirror, as
    ``cae.results.finish`` leaves it)."""
    return rundir.mirror_dir(run_dir) if rundir.is_uri(run_dir) else Path(run_dir)


def _files(run_dir: str, report: Path | None) -> list[Path]:
    local = _local(run_dir)
    return [local / rundir.SPEC_FILE, local / "trials.parquet", local / "epochs.parquet",
            *([report] if report is not None else [])]


def _table_items(run_dir: str, spec: SweepSpec, trials: pd.DataFrame, epochs: pd.DataFrame,
                 report: Path | None, state: str) -> Runs:
    """Every trial of the tables as a tracker run, then the sweep's run in ``state``."""
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    runs = table_runs(trials, epochs, spec.swept(), sweep_running=state == RUNNING)
    return [*runs, sweep_run(name, spec.model_dump(mode="json"), trials,
                             _files(run_dir, report), state)]


class SweepTracking:
    """The trackers of one sweep (or resume) while it runs: see the module docstring."""

    def __init__(self, spec: SweepSpec, run_dir: str, say: Callable[[str], None] = _stderr,
                 retry_s: float = RETRY_S):
        self.spec, self.run_dir, self.say = spec, run_dir, say
        for key, value in LIVE_MLFLOW_ENV.items():
            os.environ.setdefault(key, value)
        self.name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        hint = ("; the sweep goes on without it, trying again every "
                f"{retry_s:.0f} s, and what it does not take is kept")
        self.feeds = [Feed(t, say, retry_s, hint)
                      for t in trackers(spec.tracking, run_dir, spec.name)]
        for feed in self.feeds:  # the sweep's run first: the trials' runs go under it
            feed.put(lambda: [sweep_run(self.name, spec.model_dump(mode="json"), None,
                                        _files(run_dir, None)[:1], RUNNING)])

    def put(self, make: Callable[[], Runs]) -> None:
        """Runs made on each feed's thread by ``make``."""
        for feed in self.feeds:
            feed.put(make)

    def finish(self, trials: pd.DataFrame, epochs: pd.DataFrame, report: Path | None,
               complete: bool, wait_s: float = CLOSE_WAIT_S) -> None:
        """The run's tables (its trials' rows, the tables and ``report`` as the sweep's
        files) sent over what was sent live, waiting at most ``wait_s`` seconds in all;
        ``complete``: every trial of the sweep has ended."""
        state = FINISHED if complete else STOPPED
        items = _table_items(self.run_dir, self.spec, trials, epochs, report, state)
        for feed in self.feeds:
            feed.put(items)
        deadline = time.monotonic() + wait_s
        for feed in self.feeds:
            left = feed.close(max(0.0, deadline - time.monotonic()))
            if left:
                why = f" ({feed.failure})" if feed.failure else " (still sending)"
                self.say(f"cae: {feed.tracker.label} did not take {left} of the run's "
                         f"updates{why}; send them with: cae track {self.run_dir}")


def options(spec: TrackingConfig, mlflow: str | None = None, experiment: str | None = None,
            wandb_project: str | None = None, wandb_entity: str | None = None,
            wandb_mode: str | None = None) -> TrackingConfig:
    """``cae track``'s options over the spec's ``tracking:`` block: with none, the spec's
    trackers; else only the trackers they name, each option in place of the spec's."""
    if not any((mlflow, experiment, wandb_project, wandb_entity, wandb_mode)):
        return spec
    data: dict = {}
    if mlflow or experiment:
        base = spec.mlflow.model_dump() if spec.mlflow else {}
        data["mlflow"] = {**base, **({"uri": mlflow} if mlflow else {}),
                          **({"experiment": experiment} if experiment else {})}
    if wandb_project or wandb_entity or wandb_mode:
        base = spec.wandb.model_dump() if spec.wandb else {}
        given = {"project": wandb_project, "entity": wandb_entity, "mode": wandb_mode}
        data["wandb"] = {**base, **{k: v for k, v in given.items() if v}}
    return validate(TrackingConfig, data, "cae track")


def track_run(run_dir: str, say: Callable[[str], None] = print, **given: str | None) -> int:
    """``cae track``: send the tables of the run in ``run_dir`` (a path or a URI) to its
    spec's trackers, or to those ``given`` names (``options``). Returns the number of
    trials; a tracker that fails is a ``UserError`` saying what was not sent."""
    from cae.results.status import run_status
    from cae.results.tables import tables

    run_dir = rundir.storage_uri(run_dir)
    local = rundir.local_copy(run_dir)
    spec = rundir.load_run_spec(str(local))
    tracking = options(spec.tracking, **given)
    if not tracking.named():
        raise UserError(f"{run_dir}: no tracker to send to: give --mlflow URI or "
                        "--wandb-project PROJECT (or a tracking: block in the sweep spec)")
    check_packages(tracking)
    state = {"running": RUNNING, "finished": FINISHED}.get(run_status(run_dir).state, STOPPED)
    frames = tables(local)
    report = local / "report.html"
    items = _table_items(run_dir, spec, frames.trials, frames.epochs,
                         report if report.is_file() else None, state)
    failed = []
    for tracker in trackers(tracking, run_dir, spec.name):
        feed = Feed(tracker, say=lambda text: None)
        feed.put(items)
        left = feed.close(wait_s=None)
        if left:
            failed.append(f"{tracker.label} did not take {left} of {len(items)} runs "
                          f"({feed.failure})")
        else:
            say(f"{tracker.label}: {len(frames.trials)} trials of {run_dir} and the sweep's run")
    if failed:
        raise UserError("; ".join(failed) + f"; run `cae track {run_dir}` again once it answers")
    return len(frames.trials)

"""How far along a sweep is: one summary, for the live progress line and for ``cae status``.

A :class:`Progress` holds the trials by status, the trial-epochs done against the dry run's
maximum, the best validation loss so far with its configuration, the time elapsed and an
estimate of the time left. The progress callback (``cae.sweep.progress``) builds one from Ray
Tune's live trials; ``run_status`` builds one from a run directory (local or at a URI)
through ``cae.results.tables``, without Ray, for a running, finished or interrupted run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cae.config.spec import SweepSpec, rungs
from cae.run.outcomes import BUCKETS, all_finished, bucket, unfinished_count
from cae.run.tunefiles import EXPERIMENT_STATE


def planned_trial_epochs(spec: SweepSpec, n_trials: int, max_epochs: int,
                         strata: dict[str, int] | None = None) -> int:
    """The trial-epochs a sweep is expected to run: every trial to ``max_epochs`` under FIFO;
    under successive halving (asha, sha), per stratum of n trials, ``ceil(n / rf^k)`` (at
    least 1) trials pass rung k and the last ones run to the end. Patience stops make it
    less; it is the basis of the estimated time left."""
    s = spec.scheduler
    if s.kind == "fifo":
        return n_trials * max_epochs
    horizon = min(s.max_t or max_epochs, max_epochs)
    rung_epochs = rungs(s.grace_period, s.reduction_factor, horizon)
    total = 0
    for n in (strata or {"": n_trials}).values():
        reached, previous = n, 0
        for k, rung in enumerate(rung_epochs):
            reached = n if k == 0 else max(1, math.ceil(n / s.reduction_factor**k))
            total += reached * (rung - previous)
            previous = rung
        last = max(1, math.ceil(n / s.reduction_factor**len(rung_epochs))) if rung_epochs \
            else n
        total += min(last, reached) * (horizon - previous)
    return total


def work(spec: SweepSpec, checked, extension=None) -> tuple[int, int]:
    """(at most, expected) trial-epochs a run trains: the dry run's figures (``checked``,
    ``cae.sweep.plan.check_spec``), or for a run of ``cae extend`` (``extension``,
    ``cae.sweep.extension.read_extension``) the epochs its trials train on, not those they
    carry over from their sources."""
    if extension is not None and (most := extension.to_train()) is not None:
        return most, most
    return (checked.n_trials * checked.max_epochs,
            planned_trial_epochs(spec, checked.n_trials, checked.max_epochs, checked.strata))


def duration(seconds: float | None) -> str:
    """``1:02:03``, ``2:03``, or ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def config_text(config: dict, axes: list[str], short: bool = False) -> str:
    """``key=value`` of the swept ``axes`` in a flat trial config (``short``: the last part
    of each dotted key)."""
    parts = []
    for key, value in config.items():
        if any(key == a or key.startswith(a + ".") for a in axes):
            if isinstance(value, float):
                text = f"{value:.4g}"
            else:
                text = value if isinstance(value, str) else json.dumps(value)
            parts.append(f"{key.rsplit('.', 1)[-1] if short else key}={text}")
    return ", ".join(parts)


@dataclass
class Progress:
    """A sweep's progress at one moment (see the module docstring)."""

    total: int  # trials the sweep runs (grid points x num_samples)
    max_epochs: int  # trial-epochs at most: trials x max_epochs (the dry run's figure)
    planned: int  # trial-epochs expected with early stopping (planned_trial_epochs)
    counts: dict[str, int] = field(default_factory=dict)  # bucket -> trials
    epochs: int = 0  # trial-epochs done
    best: float | None = None  # best validation loss so far
    best_config: dict = field(default_factory=dict)  # flat config of the best trial
    elapsed: float = 0.0  # seconds
    rate: float | None = None  # trial-epochs per second, None until known

    @property
    def finished(self) -> bool:
        return self.counts.get("done", 0) + self.counts.get("errored", 0) >= self.total

    @property
    def left(self) -> float | None:
        """Seconds left, estimated from the expected trial-epochs at the rate so far."""
        if self.finished:
            return 0.0
        if not self.rate:
            return None
        return max(self.planned - self.epochs, 0) / self.rate

    def counts_text(self) -> str:
        c = self.counts
        parts = [f"{c.get('done', 0)}/{self.total} done"]
        parts += [f"{c[b]} {b}" for b in BUCKETS[1:] if c.get(b)]
        return ", ".join(parts)

    def best_text(self, axes: list[str], short: bool = False) -> str:
        if self.best is None:
            return "best val -"
        where = config_text(self.best_config, axes, short)
        return f"best val {self.best:.5f}" + (f" ({where})" if where else "")

    def time_text(self) -> str:
        left = "" if self.finished else f", ~{duration(self.left)} left"
        return f"{duration(self.elapsed)} elapsed{left}"

    def line(self, axes: list[str]) -> str:
        """The plain progress line (logs, CI, ``ray job logs``)."""
        return (f"{self.counts_text()}; {self.epochs:,}/{self.max_epochs:,} trial-epochs; "
                f"{self.time_text()}; {self.best_text(axes)}")


def rate(epochs_now: int, epochs_then: int, seconds: float) -> float | None:
    """Trial-epochs per second since a moment, None before the first one."""
    return (epochs_now - epochs_then) / seconds if epochs_now > epochs_then and seconds else None


# ---- a run directory (cae status) ---------------------------------------------------------


def _newest_result_time(run_dir: Path) -> float | None:
    """The newest result's wall-clock time (Ray's ``timestamp`` of each trial's last line)."""
    newest = None
    for path in run_dir.glob("*/result.json"):
        lines = path.read_bytes().rstrip().splitlines()
        for line in reversed(lines):
            try:
                stamp = json.loads(line).get("timestamp")
            except json.JSONDecodeError:
                continue  # a line being written right now
            if isinstance(stamp, (int, float)):
                newest = stamp if newest is None else max(newest, stamp)
            break
    return newest


def _state_written(run_dir: Path) -> float | None:
    """When Ray Tune last saved the experiment state here (it does so every few seconds
    while the sweep's driver lives)."""
    times = [p.stat().st_mtime for p in run_dir.glob(EXPERIMENT_STATE.format("*"))]
    return max(times) if times else None


@dataclass
class RunStatus:
    """``cae status``: a run's progress and whether it looks running, finished or
    interrupted."""

    run_dir: str
    progress: Progress
    state: str  # running | finished | interrupted
    unfinished: int
    idle: float | None  # seconds since the newest sign of life
    axes: list[str]
    notes: list[str] = field(default_factory=list)  # e.g. an experiment state cut short
    driver: str | None = None  # who holds the run's lease

    def text(self) -> str:
        p = self.progress
        since = "" if self.idle is None else f", newest result {duration(self.idle)} ago"
        lines = [f"{self.run_dir}: {self.state}{since}",
                 f"trials: {p.counts_text()}",
                 f"trial-epochs: {p.epochs:,} of at most {p.max_epochs:,} "
                 f"(about {p.planned:,} expected with early stopping)",
                 p.best_text(self.axes),
                 f"time: {duration(p.elapsed)} since the start"
                 + (f", ~{duration(p.left)} left" if self.state == "running" else "")]
        if self.unfinished:
            lines.append(f"unfinished trials: {self.unfinished}" + (
                f"; continue with: cae resume {self.run_dir}"
                if self.state == "interrupted" else ""))
        if self.driver:
            lines.append(f"driver: {self.driver}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _progress(spec: SweepSpec, checked, trials: pd.DataFrame, axes: list[str],
              extension=None) -> Progress:
    """Trials by bucket, trial-epochs trained and the best so far, from the run's tables."""
    from cae.results.tables import best_trial, trained_epochs

    progress = Progress(checked.n_trials, *work(spec, checked, extension))
    counts = dict.fromkeys(BUCKETS, 0)
    if not trials.empty:
        for status, reason in zip(trials["status"].astype(str),
                                  trials["stop_reason"].astype(str)):
            counts[bucket(status, reason)] += 1
        progress.epochs = trained_epochs(trials)
        best = best_trial(trials)
        if best is not None:
            progress.best = float(best["best_val_loss"])
            progress.best_config = _config_of(best, trials, axes)
    counts["pending"] += max(0, checked.n_trials - len(trials))  # not created yet
    progress.counts = counts
    return progress


def run_status(run_dir: str, now: float | None = None) -> RunStatus:
    """The status of a run directory (local or at a URI), read without Ray. It is running
    while a driver holds its lease and keeps the heartbeat (``cae.run.lease``), finished when
    every trial is, and interrupted otherwise."""
    from cae.results.tables import tables
    from cae.run import directory as rundir
    from cae.run.lease import read_holder, stale
    from cae.run.state import first_start
    from cae.sweep.extension import read_extension
    from cae.sweep.plan import check_spec

    local = rundir.local_copy(run_dir)
    spec = rundir.load_run_spec(str(local))
    checked = check_spec(spec, to_run=False)
    frames = tables(local)
    trials = frames.trials
    axes = spec.swept()
    now = time.time() if now is None else now
    progress = _progress(spec, checked, trials, axes, read_extension(str(local)))
    unfinished = unfinished_count(trials, checked.n_trials)
    start = first_start(local)  # elapsed counts every session's epochs since then
    signs = [t for t in (_newest_result_time(local), start,
                         None if rundir.is_uri(run_dir) else _state_written(local))
             if t is not None]
    newest = max(signs) if signs else None
    holder = read_holder(run_dir)
    if progress.finished or all_finished(trials, checked.n_trials):
        state = "finished"
    else:  # a driver that holds the lease and keeps its heartbeat is running it
        state = "running" if holder is not None and not stale(holder, now) else "interrupted"
    end = now if state == "running" else newest
    progress.elapsed = (end - start) if start is not None and end is not None else 0.0
    if state == "running" and progress.elapsed > 0:
        progress.rate = rate(progress.epochs, 0, progress.elapsed)
    driver = None if holder is None else (
        holder.describe(now) + (" (gone)" if stale(holder, now) else ""))
    idle = None if newest is None else max(0.0, now - newest)
    return RunStatus(run_dir, progress, state, unfinished, idle, axes, frames.notes, driver)


def _config_of(best: pd.Series, trials: pd.DataFrame, axes: list[str]) -> dict:
    """The best trial's values of the swept axes (a variant axis by its ``variant.*``
    columns), as a flat config."""
    out = {}
    for key in axes:
        cols = [c for c in trials.columns if c == key or c.startswith(key + ".")]
        for col in cols:
            value = best[col]
            if isinstance(value, float) and math.isnan(value):
                continue
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            out[col] = value.item() if hasattr(value, "item") else value
    return out

"""How a trial ended, in one place: statuses, stop reasons, what "finished" and "trained to
the end" mean.

A trial's ``status`` is Ray Tune's (PENDING, RUNNING, PAUSED, TERMINATED, ERROR), or
UNKNOWN where no readable experiment state names it. Its ``stop_reason`` says why it
stopped: its own end (``max_epochs``, ``patience``), the scheduler's (``sha``, ``asha``),
``error: ...``, or, while it has not ended, its status in lower case. Every reader (the
tables, the report, ``cae status``, the progress bar, the search) asks these functions.
"""

from __future__ import annotations

import pandas as pd

# Statuses of a trial that will still run (Ray Tune's names).
NOT_FINISHED = ("RUNNING", "PENDING", "PAUSED")
# Stop reasons a trial reports itself at its last epoch.
OWN_ENDS = ("max_epochs", "patience")
# What a trial whose loss became NaN or infinite reports (``cae.train.loop``): it ends, with
# the reason as its error, and reads as one.
DIVERGED = "diverged"
# Stop reasons of trials the scheduler stopped early (at a rung of successive halving).
SCHEDULER_STOPS = ("asha", "sha")
# Progress buckets of a sweep, in the order they are shown.
BUCKETS = ("done", "running", "paused", "pending", "errored")
_BUCKET_OF = {"TERMINATED": "done", "RUNNING": "running", "PAUSED": "paused",
              "PENDING": "pending", "ERROR": "errored"}


def stop_reason(status: str, reported: str | None, error: str, scheduler: str) -> str:
    """Why a trial stopped: an error (``error: <its last line>``), the end it reported
    itself, the scheduler's stop (a TERMINATED trial that reported no end of its own), or,
    for a trial that has not ended, its status in lower case."""
    if error:
        return f"error: {error}"
    if reported:
        return reported
    if status == "TERMINATED":
        return scheduler if scheduler in SCHEDULER_STOPS else "stopped"
    return status.lower()


def bucket(status: str, reason: str = "") -> str:
    """A trial's progress bucket; a trial that reported an end of its own is done whatever
    its status (Ray writes its state every few seconds: RUNNING or UNKNOWN there may
    already have ended), one that diverged errored (it ends without failing in Tune)."""
    if reason == DIVERGED:
        return "errored"
    if reason in OWN_ENDS and status != "ERROR":
        return "done"
    return _BUCKET_OF.get(status, "running")


def _column(trials: pd.DataFrame, name: str) -> pd.Series:
    return trials.get(name, pd.Series("", index=trials.index)).astype(str)


def unfinished_mask(trials: pd.DataFrame) -> pd.Series:
    """The trials that will still run: running, pending or paused, or whose status no
    readable state gives (``UNKNOWN``), unless they reported an end of their own (the state
    on disk can lag behind a trial's last report)."""
    if trials.empty or "status" not in trials:
        return pd.Series(False, index=trials.index)
    status, reason = _column(trials, "status"), _column(trials, "stop_reason")
    return (status.isin(NOT_FINISHED) | (status == "UNKNOWN")) & ~reason.isin(OWN_ENDS)


def unfinished_count(trials: pd.DataFrame, n_trials: int) -> int:
    """How many of a sweep's ``n_trials`` trials will still run: those of ``trials`` that
    will (``unfinished_mask``) and those not in it yet (never started)."""
    return int(unfinished_mask(trials).sum()) + max(0, n_trials - len(trials))


def all_finished(trials: pd.DataFrame, n_trials: int) -> bool:
    """Whether the run is finished: all ``n_trials`` trials exist and none will still run."""
    return unfinished_count(trials, n_trials) == 0


def trained_to_the_end(trials: pd.DataFrame) -> pd.Series:
    """Trials that ran until their own end (max_epochs or patience), neither stopped by the
    scheduler nor unfinished nor failed: the only ones whose error says what the
    architecture can do."""
    if "stop_reason" not in trials:
        return ~unfinished_mask(trials)
    return _column(trials, "stop_reason").isin(OWN_ENDS) & ~unfinished_mask(trials)


def stopped_early(trials: pd.DataFrame) -> pd.Series:
    """Trials the scheduler stopped at a rung (their error is from fewer epochs)."""
    return _column(trials, "stop_reason").isin(SCHEDULER_STOPS)

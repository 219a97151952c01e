"""What a trial and a sweep become in an experiment tracker, made from the rows of the run's
tables: one row of ``trials`` and that trial's rows of ``epochs`` make one :class:`TrialRun`.

Every tracker (``cae.track.mlflowtracker``, ``cae.track.wandbtracker``) takes a
``TrialRun``, whoever made the rows: ``cae track`` and the end of a sweep read them from
the tables (:func:`table_runs`); the live feed makes the same rows from the results Ray Tune
hands the driver (``cae.track.live``). A tracker sends only what it does not hold yet, so
the same rows sent twice leave each epoch there once.

- params: the trial's configuration columns (flat dotted keys, as in ``trials.parquet``),
  with its params, latent size and family;
- per epoch (step = epoch): every numeric column of ``epochs`` (losses, each distortion's
  validation error, the learning rate where trials report one, epoch time), with
  ``trained_ahead`` (1 for an epoch trained ahead of an undecided rung by the scheduler);
- at the end, every other column of the trial's row: the numbers (best validation loss and
  epoch, test losses, epochs, wall time, failures, ...) as metrics, the rest (status, stop
  reason, where it ran) as tags, since they change on a resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cae.config.trial import TrialConfig

# The columns of ``trials`` that say what a trial ran (``cae.run.record.columns``): every
# setting of a TrialConfig (its first dotted part a field of it), its point's repeat and
# variants, and what its record adds; sent as params. Every other column is its outcome:
# numbers as end metrics, the rest as tags (they change on a resume). ``device`` and
# ``precision`` are both a setting and where the trial ran; the tables keep the latter.
RECORD_COLUMNS = ("repeat", "config_id", "params", "latent_size", "family", "recorded")
RAN_ON = ("device", "precision")
NOT_SENT = ("trial_id", "node_id")  # the trial id is the run's key; the node is in ``node``
TRAINED_AHEAD, SPECULATIVE = "trained_ahead", "speculative"
TRIAL_ID_TAG, RUN_TAG, KIND_TAG = "cae.trial_id", "cae.run", "cae.kind"

# A trial's state in a tracker: a finished, failed or running run, or one stopped with an
# interrupted sweep (it goes on with ``cae resume``).
FINISHED, FAILED, RUNNING, STOPPED = "finished", "failed", "running", "stopped"


@dataclass
class TrialRun:
    """One trial as a tracker run."""

    trial_id: str
    name: str  # the trial id and its swept values
    params: dict[str, str]
    tags: dict[str, str]
    steps: dict[int, dict[str, float]]  # epoch -> its metrics
    summary: dict[str, float]  # the end values (the best so far while it runs)
    state: str  # FINISHED, FAILED, RUNNING or STOPPED

    @property
    def last_step(self) -> int:
        return max(self.steps, default=int(self.summary.get("epochs", 0) or 0))


@dataclass
class SweepRun:
    """The sweep as the parent run of its trials: the spec, and at the end the tables and
    the report as files."""

    name: str  # the run directory's name
    params: dict[str, str]
    tags: dict[str, str]
    summary: dict[str, float]
    state: str
    files: list[Path] = field(default_factory=list)


def _number(value: Any) -> float | None:
    """A finite number as a float (booleans as 0/1), else None."""
    if isinstance(value, bool):
        return float(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def param_text(value: Any) -> str:
    """A configuration value as a tracker param: lists are JSON text already (the tables'
    own form), a missing value is ``None``."""
    if _absent(value):
        return "None"
    if hasattr(value, "item"):  # a numpy scalar from a table
        value = value.item()
    return value if isinstance(value, str) else json.dumps(value)


def run_name(trial_id: str, row: dict, axes: list[str]) -> str:
    """The trial id with its values of the swept ``axes`` (``4a1e0c2d latent_dim=8 convs=2``):
    the last part of each dotted key, as the progress line writes them."""
    parts = []
    for key, value in row.items():
        if any(key == a or key.startswith(a + ".") for a in axes) and not _absent(value):
            text = f"{value:.4g}" if isinstance(value, float) else param_text(value)
            parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    return " ".join([trial_id, *parts])


def state_of(status: str, sweep_running: bool) -> str:
    """A trial's tracker state from its status in the tables (Ray Tune's): one that has not
    ended is running while its sweep runs, else stopped with it."""
    if status == "TERMINATED":
        return FINISHED
    if status == "ERROR":
        return FAILED
    return RUNNING if sweep_running else STOPPED


def epoch_metrics(row: dict) -> dict[str, float]:
    """One epoch's metrics: every numeric column of its ``epochs`` row (new columns, such as
    ``lr``, come along as trials report them) and whether it was trained ahead."""
    out = {k: x for k, v in row.items()
           if k not in ("trial_id", "epoch") and (x := _number(v)) is not None}
    out[TRAINED_AHEAD] = 0.0 if _absent(row.get(SPECULATIVE)) else 1.0
    return out


def is_setting(column: str) -> bool:
    """Whether a ``trials`` column says what the trial ran (a param), not how it went."""
    return column not in RAN_ON and (
        column.split(".", 1)[0] in TrialConfig.model_fields or column in RECORD_COLUMNS
        or column.startswith("variant"))


def trial_run(row: dict, epochs: list[dict], axes: list[str], sweep_running: bool) -> TrialRun:
    """A trial's tracker run from its ``trials`` row and its ``epochs`` rows; ``axes``: the
    swept keys (for the run's name); ``sweep_running``: whether its sweep is running (a
    trial that has not ended is then running, else stopped)."""
    trial_id = str(row["trial_id"])
    params, summary, tags = {}, {}, {}
    for key, value in row.items():
        if key in NOT_SENT:
            continue
        if is_setting(key):
            params[key] = param_text(value)
        elif not isinstance(value, str) and (x := _number(value)) is not None:
            summary[key] = x
        elif not _absent(value):
            tags[key] = str(value)
    steps = {int(e["epoch"]): epoch_metrics(e) for e in epochs}
    return TrialRun(trial_id, run_name(trial_id, row, axes), params, tags, steps, summary,
                    state_of(str(row.get("status", "")), sweep_running))


def table_runs(trials: pd.DataFrame, epochs: pd.DataFrame, axes: list[str],
               sweep_running: bool = False) -> list[TrialRun]:
    """Every trial of the tables as a tracker run."""
    by_trial: dict[str, list[dict]] = {}
    for e in epochs.to_dict("records"):
        by_trial.setdefault(str(e["trial_id"]), []).append(e)
    return [trial_run(row, by_trial.get(str(row["trial_id"]), []), axes, sweep_running)
            for row in trials.to_dict("records")]


def sweep_run(name: str, spec: dict, trials: pd.DataFrame | None, files: list[Path],
              state: str) -> SweepRun:
    """The sweep's parent run in ``state``: the spec's scheduler, search and swept axes as
    params, the trials' counts and the best validation loss as metrics, and ``files``."""
    space = spec.get("space") or {}
    params = {"name": str(spec.get("name", "")), "num_samples": str(spec.get("num_samples", 1)),
              "scheduler": json.dumps(spec.get("scheduler") or {}, sort_keys=True),
              "search": json.dumps(spec.get("search") or {}, sort_keys=True),
              **{f"space.{k}": json.dumps(v, sort_keys=True) for k, v in space.items()}}
    summary: dict[str, float] = {}
    if trials is not None and len(trials):
        status = trials["status"].astype(str)
        summary = {"trials": float(len(trials)),
                   "trials_finished": float((status == "TERMINATED").sum()),
                   "trials_failed": float((status == "ERROR").sum())}
        best = _number(trials["best_val_loss"].min())
        if best is not None:
            summary["best_val_loss"] = best
    tags = {RUN_TAG: name, KIND_TAG: "sweep"}
    return SweepRun(name, params, tags, summary, state,
                    [f for f in files if f.is_file()])

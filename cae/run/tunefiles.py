"""Ray Tune's own files in a run directory, read without importing Ray.

A finished or interrupted run must open where Ray is absent or of another version (a
notebook, a serving box, a colleague's laptop), so the experiment-state JSON and the names
of Tune's state files are read here with the standard library. ``cae.sweep.internals``
checks, when a sweep or a resume starts, that the installed Ray still writes these names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The files Tune keeps a run's state in, at the top of the run directory ({} is the
# session's timestamp); ``experiment_state`` is the one ``Tuner.restore`` reads.
EXPERIMENT_STATE = "experiment_state-{}.json"
STATE_FILES = (EXPERIMENT_STATE, "searcher-state-{}.pkl", "search_gen_state-{}.json",
               "basic-variant-state-{}.json", "callback-states-{}.pkl")


@dataclass(frozen=True)
class TrialState:
    """What Tune's experiment state says of one trial."""

    status: str
    trial_id: str
    num_failures: int
    # a fused pack formed from members of earlier packs: their folders (``cae.run.packfiles``),
    # from its config, which Tune keeps even for a trial that failed before it wrote its files
    homes: tuple[str, ...] = ()


class StateFormatError(ValueError):
    """An experiment-state file that is not Tune's JSON (torn, or another Ray's)."""


def read_experiment_state(text: str) -> tuple[dict[str, TrialState], float | None]:
    """Tune's experiment-state JSON -> (trial directory name -> its state, start time).

    Raises :class:`StateFormatError` for a file that is not whole (cut short by a full
    disk or a killed driver) or not in the form this Ray writes."""
    try:
        data = json.loads(text)
        trials = {}
        for trial_json, meta_json in data["trial_data"]:
            trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            meta = json.loads(meta_json) if isinstance(meta_json, str) else meta_json
            config = trial.get("config")
            homes = config.get("homes") if isinstance(config, dict) else None
            trials[trial["relative_logdir"]] = TrialState(
                str(trial["status"]), str(trial["trial_id"]),
                int((meta or {}).get("num_failures", 0)),
                tuple(homes) if isinstance(homes, list) else ())
        start = data.get("stats", {}).get("start_time")
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFormatError(f"{type(exc).__name__}: {exc}") from None
    return trials, float(start) if isinstance(start, (int, float)) else None


def last_error(trial_dir: Path) -> str:
    """The last line of a trial's ``error.txt`` ("error" if all are blank), "" without one."""
    path = trial_dir / "error.txt"
    if not path.is_file():
        return ""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return next((ln for ln in reversed(lines) if ln), "error")

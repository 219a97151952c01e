"""The rows of a running sweep's tables, made from what the driver sees as it happens.

Ray Tune hands the driver each result; ``cae.track.callback`` collects them with the trial's
status as :class:`Seen`, and :class:`LiveRows` turns them, on a feed's thread, into the rows
``cae.results.tables`` would write for them: the epochs through the tables' own
``epoch_rows`` (so every per-epoch column comes along, the scheduler's marks on epochs
trained ahead included), the configuration columns through ``cae.run.record.columns`` from
the record the trial wrote at its start, and the outcome so far; once the trial has ended,
its row is the tables' own ``trial_row`` of its files. Those rows become tracker runs
through ``cae.track.runs.trial_run``, as the tables' rows do in ``cae track``; at the end
of the sweep the tables' rows are sent over them (``cae.track.send``).

A fused pack is one Tune trial for several of the sweep's trials: its members' rows are
read from their folders, as the tables read them, on each of the pack's results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cae.config.spec import SweepSpec
from cae.results.tables import epoch_rows, merged_epochs, read_trial, trial_row
from cae.run import outcomes, packfiles
from cae.run.checkpoints import filesystem
from cae.run.directory import is_uri
from cae.run.record import RECORD_FILE, columns
from cae.run.tunefiles import TrialState
from cae.track.runs import TrialRun, trial_run

# What a trial's reports say of where and how it trains: kept in its row as the tables do.
_FACTS = ("device", "precision", "hostname", "data_loaded")
ENDED = ("TERMINATED", "ERROR")


@dataclass
class Seen:
    """One Tune trial as the driver saw it: the results it reported since the last update
    (copies), its newest result, status and failures, and its folder in the run."""

    trial_id: str
    folder: str
    status: str
    num_failures: int
    results: list[dict]
    last: dict
    pack: bool = False


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def outcome_so_far(last: dict, status: str, num_failures: int, scheduler: str,
                   error: str = "") -> dict:
    """The outcome columns of a trial's row from its newest report: its status, why it
    stopped (``cae.run.outcomes``, as the tables say it), its epochs, best and last
    validation loss so far, wall time, and the test errors once it has them."""
    out = {"status": status, "num_failures": num_failures,
           "stop_reason": outcomes.stop_reason(status, last.get("stop_reason"), error,
                                               scheduler)}
    if "epoch" in last:
        out["epochs"] = int(last["epoch"])
        out["wall_time_s"] = last.get("time_total_s")
        if _finite(last.get("val_loss")):
            out["last_val_loss"] = last["val_loss"]
    if _finite(last.get("best_val_loss")):
        out["best_val_loss"] = last["best_val_loss"]
        if last.get("best_epoch"):
            out["best_epoch"] = int(last["best_epoch"])
    out.update({k: last[k] for k in _FACTS if k in last})
    out.update({k: v for k, v in last.items() if k.startswith("test_")})
    return out


class LiveRows:
    """Tracker runs from what the driver of ``spec``'s sweep in ``run_dir`` sees (see the
    module docstring)."""

    def __init__(self, run_dir: str, spec: SweepSpec):
        self.run_dir, self.axes, self.base = run_dir.rstrip("/"), spec.swept(), spec.trial
        s = spec.scheduler
        self.scheduler = s.kind
        self.halving = (s.grace_period, s.reduction_factor) if (
            s.kind == "sha" and s.work_ahead) else None
        self._records: dict[str, dict] = {}  # folder -> the trial's record, once read

    def runs(self, seen: list[Seen]) -> list[TrialRun]:
        out = []
        for s in seen:
            if s.pack:
                out += self._members(s)
                continue
            by_epoch = {int(r["epoch"]): r for r in s.results if "epoch" in r}
            out.append(trial_run(self._row(s), epoch_rows(s.trial_id, by_epoch), self.axes,
                                 sweep_running=True))
        return out

    def _row(self, s: Seen) -> dict:
        """A trial's row: once it has ended, made by the tables' own ``trial_row`` from its
        files and the driver's newest result (which its result.json may lack yet); until
        then its record's columns and its outcome so far."""
        if s.status in ENDED and not is_uri(self.run_dir):
            files = read_trial(Path(self.run_dir) / s.folder)
            files.results += [s.last] if s.last else []
            return trial_row(files, merged_epochs(files),
                             TrialState(s.status, s.trial_id, s.num_failures), self.base,
                             self.scheduler, self.halving)
        record = self._record(s.folder)
        return {"trial_id": s.trial_id, **(columns(record) if record else {}),
                **outcome_so_far(s.last, s.status, s.num_failures, self.scheduler)}

    def _record(self, folder: str) -> dict | None:
        """The record the trial wrote when it started (read once; None until it has)."""
        if folder not in self._records:
            fs, path = filesystem(f"{self.run_dir}/{folder}/{RECORD_FILE}")
            try:
                with fs.open_input_stream(path) as f:
                    self._records[folder] = json.loads(f.read())
            except (OSError, ValueError):
                return None
        return self._records[folder]

    def _members(self, s: Seen) -> list[TrialRun]:
        """A fused pack's members, each read from its folder as the tables read it (a local
        run; at a URI the end of the sweep sends them)."""
        if is_uri(self.run_dir):
            return []
        out = []
        pack = TrialState(s.status, s.trial_id, s.num_failures)
        for folder, _ in packfiles.members(Path(self.run_dir) / s.folder):
            if not folder.is_dir():
                continue
            files = read_trial(folder, f"{s.folder}/{folder.name}")
            by_epoch = merged_epochs(files)
            state, files.error = packfiles.member_state(files.name, files.history, pack)
            row = trial_row(files, by_epoch, state, self.base, "fifo")
            out.append(trial_run(row, epoch_rows(row["trial_id"], by_epoch), self.axes,
                                 sweep_running=True))
        return out

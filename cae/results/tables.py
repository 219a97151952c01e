"""A run directory -> its tables, the interface every reader uses.

This module is the only reader of what Ray Tune writes: each trial's ``params.json`` (its
search-space point), ``result.json`` (one row per report), ``error.txt``, its checkpoints'
``history.json``, and the run's state (statuses, through ``cae.run.state``); plus what
cae writes: ``spec.yaml`` and each trial's own record of what it ran (``cae.run.record``). It
works on a finished, running or interrupted run alike, without starting Ray.

``export`` writes ``trials.parquet`` (one row per trial) and ``epochs.parquet`` (one row
per trial and epoch); ``tables`` reads them back, refreshing them first when the run has
changed since, so the report, ``cae status``, the live report and the notebook all see the
same columns with the same types.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

from cae.config.errors import UserError
from cae.config.points import REPEAT_KEY, apply_point
from cae.config.spec import SchedulerConfig, rungs
from cae.config.trial import TrialConfig
from cae.results.learning import curve_facts
from cae.run import outcomes, packfiles
from cae.run import state as runstate
from cae.run.checkpoints import newest_history
from cae.run.directory import BASELINES_FILE, read_spec, write_file
from cae.run.outcomes import SCHEDULER_STOPS
from cae.run.record import RECORD_FILE, columns, flatten, make_record, trial_config_of
from cae.run.tunefiles import TrialState, last_error

TRIALS_FILE, EPOCHS_FILE = "trials.parquet", "epochs.parquet"
_SCHEDULER_DEFAULTS = SchedulerConfig()  # for a spec that leaves a field out
EPOCH_COLUMNS = ("train_loss", "val_loss", "epoch_time_s", "time_total_s", "pack")
# Ray Tune's bookkeeping fields, and a trial's facts that are not per epoch.
_NOT_PER_EPOCH = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "should_checkpoint", "params", "latent_size", "device",
    "node_id", "stop_reason", "best_val_loss", "best_epoch", "data_loaded", "precision",
    "resumed_from", "reported_again",
}


# ---- one trial's files -------------------------------------------------------------------


@dataclass
class TrialFiles:
    """What one trial directory holds."""

    name: str
    point: dict
    record: dict | None
    results: list[dict]  # result.json rows, in order
    history: dict  # the newest whole checkpoint's history.json: epochs, static, final
    error: str  # the last line of error.txt

    @property
    def trial_id(self) -> str | None:
        return self.results[0]["trial_id"] if self.results else None


def _member(files: TrialFiles, point: dict) -> TrialFiles:
    """A fused pack's member, its point from the pack's when it has not started."""
    files.point = files.point or point
    return files


def _json_lines(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written right now
    return rows


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_trial(trial_dir: Path, name: str | None = None, *,
               outcome: bool = True) -> TrialFiles:
    """A trial directory's files; ``name`` (default: the folder's) is its path in the run.
    ``outcome`` False reads only what says which trial it is (``params.json`` and its
    record), for a caller after its configuration: the reports, history and error stay
    empty."""
    point = _json(trial_dir / "params.json") or {}
    record = _json(trial_dir / RECORD_FILE)
    if not outcome:
        return TrialFiles(name or trial_dir.name, point, record, [], {}, "")
    return TrialFiles(name or trial_dir.name, point, record,
                      _json_lines(trial_dir / "result.json"), newest_history(trial_dir),
                      last_error(trial_dir))


def merged_epochs(files: TrialFiles) -> dict[int, dict]:
    """Epoch -> its report. A resumed trial may report an epoch again (the last wins);
    epochs that result.json lacks come from the trial's newest checkpoint (Ray Tune rewrites
    result.json from an older copy when a trial restarts from a checkpoint, and a driver
    crash can leave it behind)."""
    by_epoch = {int(r["epoch"]): r for r in files.results if "epoch" in r}
    static = files.history.get("static", {})
    for h in files.history.get("epochs", []):
        by_epoch.setdefault(int(h["epoch"]), {**static, **h})
    return dict(sorted(by_epoch.items()))


def counted_epochs(by_epoch: dict[int, dict]) -> dict[int, dict]:
    """A trial's epochs that count for its answer: an epoch trained ahead of a rung not
    decided yet (``speculative`` set by ``cae.schedule.schedulers``' work ahead) counts only when a
    later (or the same, reported again) epoch without the flag shows that the trial was
    promoted at that rung; a trial stopped there keeps its epochs up to the rung."""
    confirmed = max((e for e, r in by_epoch.items() if _absent(r.get("speculative"))),
                    default=0)
    return {e: r for e, r in by_epoch.items()
            if _absent(r.get("speculative")) or e <= confirmed}


def epoch_rows(trial_id: str, by_epoch: dict[int, dict]) -> list[dict]:
    """A trial's rows of ``epochs``; ``pack``: the fused pack that trained the epoch (its
    directory; None for a trial trained alone)."""
    return [{"trial_id": trial_id, "epoch": epoch,
             **{k: v for k, v in r.items() if k not in _NOT_PER_EPOCH and k != "epoch"
                and k != "pack" and not k.startswith("test_")},
             "time_total_s": r.get("time_total_s"), "pack": r.get("pack")}
            for epoch, r in by_epoch.items()]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _rung_cap(by_epoch: dict[int, dict], halving: tuple[int, float]) -> dict[int, dict]:
    """The epochs up to the last rung a trial stopped by synchronous halving reached: a
    trial trains ahead of an undecided rung at most to the epoch before the next, so any
    epoch past that rung is one it lost there (its flags may be lost with Ray's rewritten
    result.json, the checkpoint's history having none)."""
    trained = max(by_epoch, default=0)
    below = [r for r in rungs(*halving, trained + 1) if r <= trained]
    return {e: r for e, r in by_epoch.items() if e <= below[-1]} if below else by_epoch


def _outcome(files: TrialFiles, by_epoch: dict[int, dict], state: TrialState | None,
             scheduler: str, halving: tuple[int, float] | None = None) -> dict:
    """Status, stop reason, losses and where and how the trial ran; ``halving``: (grace
    period, reduction factor) of a ``sha`` sweep that works ahead."""
    last = files.results[-1] if files.results else {}
    if by_epoch and max(by_epoch) > int(last.get("epoch", 0)):  # newest only in a checkpoint
        last = {**last, **by_epoch[max(by_epoch)], **(files.history.get("final") or {})}
    trained = max(by_epoch, default=0)
    by_epoch = counted_epochs(by_epoch)  # the answer leaves out unconfirmed work ahead
    if max(by_epoch, default=0) < trained:  # stopped at a rung it had trained past:
        last = {k: v for k, v in last.items()  # its own end and test do not count
                if k != "stop_reason" and not k.startswith("test_")}
    status = state.status if state else ("ERROR" if files.error else "UNKNOWN")
    error = "" if status == "TERMINATED" else files.error  # failed once, then finished
    reason = outcomes.stop_reason(status, last.get("stop_reason"), error, scheduler)
    if halving and reason == "sha":
        by_epoch = _rung_cap(by_epoch, halving)
    vals = {e: r["val_loss"] for e, r in by_epoch.items() if _finite(r.get("val_loss"))}
    # the trainer's own best (an improvement must beat min_delta; the best weights, the test
    # errors and load_model follow it), else the lowest validation loss reported
    own = _finite(last.get("best_val_loss")) and last.get("best_epoch") in vals
    return {
        "best_val_loss": last["best_val_loss"] if own else min(vals.values(), default=math.nan),
        "best_epoch": int(last["best_epoch"]) if own else min(vals, key=vals.get, default=0),
        "last_val_loss": vals[max(vals)] if vals else math.nan,
        "epochs": max(by_epoch, default=0),
        "speculative_epochs": trained - max(by_epoch, default=0),
        "status": status,
        "stop_reason": reason,
        "wall_time_s": last.get("time_total_s", 0.0),
        "node": f"{last.get('node_ip', '?')}/{str(last.get('node_id'))[:8]}"
        if last.get("node_id") else None,  # where it ran last: IP / node id
        "node_id": last.get("node_id"),
        "hostname": last.get("hostname"),
        "device": last.get("device"),
        "precision": last.get("precision"),  # what autocast ran in (fp32 or bf16)
        "data_loaded": last.get("data_loaded"),  # what the trial really trained on
        "num_failures": state.num_failures if state else 0,
        "trial_dir": files.name,
        **{k: v for k, v in last.items() if k.startswith("test_")},
    }


@lru_cache(maxsize=4096)
def _planned_columns(base_and_point: str) -> dict:
    """The columns of a trial without a record: its configuration as this cae resolves it
    from the spec (what it will run if it has not started)."""
    base, point = json.loads(base_and_point)
    try:
        return columns(make_record(trial_config_of(None, base, point), point), recorded=False)
    except (ValueError, UserError):  # a hand-edited params.json: the settings as given
        given = {k: v for k, v in point.items() if k != REPEAT_KEY}
        return {**flatten(apply_point(json.loads(json.dumps(base)), given)), "recorded": False}


def trial_row(files: TrialFiles, by_epoch: dict[int, dict], state: TrialState | None,
              base: dict, scheduler: str, halving: tuple[int, float] | None = None) -> dict:
    """One row of ``trials``: the trial's configuration (from its record) and outcome;
    ``by_epoch``: its ``merged_epochs``."""
    config = columns(files.record) if files.record else _planned_columns(
        json.dumps([base, files.point], sort_keys=True))
    trial_id = files.trial_id or (state.trial_id if state else files.name)
    outcome = _outcome(files, by_epoch, state, scheduler, halving)
    vals = [r.get("val_loss") for e, r in by_epoch.items() if e <= outcome["epochs"]]
    return {"trial_id": trial_id, **config, **outcome,
            **curve_facts(vals, config.get("min_delta"), outcome["stop_reason"]),
            **_extension(files.record)}


def _extension(record: dict | None) -> dict:
    """Where a trial of ``cae extend`` came from: the trial it trains on (``<run>/<trial
    dir>``) and the epoch it took over at."""
    if not record or "extends" not in record:
        return {}
    return {"extends": record["extends"], "extended_at": record.get("extended_at")}


# ---- the run ---------------------------------------------------------------------------


@dataclass
class Frames:
    """The two tables of a run, and what the reader should be told about them."""

    trials: pd.DataFrame
    epochs: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def trial_dirs(run_dir: Path, *, outcome: bool = True) -> list[TrialFiles]:
    """Every trial of the run, without those a later trial took over (``continues``); a
    fused pack's members each as a trial (``cae.run.packfiles``). ``outcome``: as
    ``read_trial``'s."""
    found = []
    for p in sorted(run_dir.iterdir()):
        if p.name.startswith(".") or not (p / "params.json").is_file() or packfiles.regrouped(p):
            continue  # a pack of members who live in the folders of their first packs
        members = packfiles.members(p)
        found += [read_trial(p, outcome=outcome)] if not members else [
            _member(read_trial(m, f"{p.name}/{m.name}", outcome=outcome), point)
            for m, point in members]
    taken = {f.record.get("continues") for f in found if f.record}
    return [f for f in found if f.name not in taken]


def read_frames(run_dir: str | Path) -> Frames:
    """The ``trials`` and ``epochs`` frames of a run directory, made from Ray's files."""
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    statuses = runstate.read_statuses(run_dir)
    sched, default = spec.get("scheduler") or {}, _SCHEDULER_DEFAULTS
    scheduler = sched.get("kind", default.kind)
    halving = (sched.get("grace_period", default.grace_period),
               sched.get("reduction_factor", default.reduction_factor)) if (
        scheduler == "sha" and sched.get("work_ahead", default.work_ahead)) else None
    later = packfiles.holders(run_dir, statuses.trials)
    rows, epochs = [], []
    for files in trial_dirs(run_dir):
        state, files.error = packfiles.trial_state(run_dir, files.name, files.history,
                                                   files.error, statuses.trials, later,
                                                   halving=scheduler in SCHEDULER_STOPS)
        by_epoch = merged_epochs(files)
        row = trial_row(files, by_epoch, state, spec.get("trial") or {}, scheduler, halving)
        rows.append(row)
        epochs += epoch_rows(row["trial_id"], by_epoch)
    trials = pd.DataFrame(rows)
    if len(trials) and "test_loss" not in trials:
        trials["test_loss"] = math.nan
    notes = [statuses.note] if statuses.note else []
    started = trials[trials["epochs"] > 0] if len(trials) else trials
    legacy = int((~started["recorded"].astype(bool)).sum()) if len(started) else 0
    if legacy:
        notes.append(f"{legacy} trials have no record of the configuration they ran (a run "
                     "from before cae kept one): their config columns are made from the spec "
                     "with this cae's defaults")
    epochs_df = pd.DataFrame(epochs, columns=None if epochs else ["trial_id", "epoch",
                                                                   *EPOCH_COLUMNS])
    return Frames(trials, epochs_df, notes)


def load_frames(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(trials, epochs)`` made from Ray's files (``read_frames`` without the notes)."""
    frames = read_frames(run_dir)
    return frames.trials, frames.epochs


# ---- the Parquet tables ------------------------------------------------------------------


def _kind(value) -> str:
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _absent(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def for_parquet(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every object column that mixes text (lists are JSON text already) and
    numbers or booleans as text throughout; other columns as they are."""
    out = frame.copy()
    for col in [c for c in out.columns if out[c].dtype == "object"]:
        if len({_kind(v) for v in out[col] if not _absent(v)}) > 1:
            out[col] = out[col].map(
                lambda v: v if _absent(v) or isinstance(v, str) else json.dumps(v))
    return out


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` (``for_parquet``) as the bytes of a Parquet file."""
    buffer = io.BytesIO()
    for_parquet(frame).to_parquet(buffer, index=False)
    return buffer.getvalue()


def read_baselines(run_dir: str | Path) -> pd.DataFrame | None:
    """The reference errors of a run (``cae.results.baselines``), or None when none are written."""
    path = Path(run_dir) / BASELINES_FILE
    return pd.read_parquet(path) if path.is_file() else None


def export(run_dir: str | Path) -> Frames:
    """Write trials.parquet and epochs.parquet into the (local) run directory, each whole.

    Lists and mappings are JSON text (``model.channels`` "[16, 32]"). A column whose trials
    hold values of different kinds (``model.convs`` 1 in one trial and [3, 4] in another;
    ``padding`` 1 or "same") is all text, since a Parquet column has one type: its numbers
    as JSON text too ("1"), so ``json.loads`` reads back every value but plain words.
    Returns the frames as read back from the files."""
    return _export(Path(run_dir))


def _export(run_dir: Path, tolerate: bool = False) -> Frames:
    """``export``'s work: the frames read once, encoded, written, and read back from the
    encoded bytes. ``tolerate``: a directory that cannot be written (this user may not, a
    full disk) costs the files, not the tables, and a note says so."""
    frames = read_frames(run_dir)
    data = [parquet_bytes(frames.trials), parquet_bytes(frames.epochs)]
    notes = list(frames.notes)
    try:
        for name, blob in zip((TRIALS_FILE, EPOCHS_FILE), data):
            write_file(run_dir, name, blob)
    except OSError as exc:
        if not tolerate:
            raise
        notes.append(f"the tables could not be written into {run_dir} ({exc}); read in memory")
    return Frames(*(pd.read_parquet(io.BytesIO(b)) for b in data), notes)


def table_paths(run_dir: str | Path) -> tuple[Path, Path]:
    return Path(run_dir) / TRIALS_FILE, Path(run_dir) / EPOCHS_FILE


def _stale(run_dir: Path) -> bool:
    """Whether the tables are missing or older than a file Ray or a trial wrote since."""
    made = [p.stat().st_mtime for p in table_paths(run_dir) if p.is_file()]
    if len(made) < 2:
        return True
    newest = max((p.stat().st_mtime for pattern in ("*.json", "*/result.json", "*/error.txt",
                                                    f"*/{RECORD_FILE}", "*/checkpoint_*",
                                                    "*/member_*/checkpoint_*",
                                                    f"*/member_*/{packfiles.STOPPED_FILE}")
                  for p in run_dir.glob(pattern)), default=0.0)
    return newest > min(made)


def tables(run_dir: str | Path, refresh: bool | None = None) -> Frames:
    """The run's tables as they are on disk; exported first when ``refresh``, or (None)
    when they are missing or older than what the run wrote since."""
    run_dir = Path(run_dir)
    if refresh or (refresh is None and _stale(run_dir)):
        return _export(run_dir, tolerate=True)
    trials_path, epochs_path = table_paths(run_dir)
    return Frames(pd.read_parquet(trials_path), pd.read_parquet(epochs_path))


def trained_epochs(trials: pd.DataFrame) -> int:
    """The trial-epochs a run trained: each trial's epochs less those its source had
    trained before (``extended_at``, a trial of ``cae extend``)."""
    if trials.empty:
        return 0
    carried = trials["extended_at"].fillna(0) if "extended_at" in trials else 0
    return int((trials["epochs"] - carried).clip(lower=0).sum())


def carried_epochs(trials: pd.DataFrame) -> int:
    """The epochs the trials of a ``cae extend`` run took over from their sources."""
    return int(trials["extended_at"].fillna(0).sum()) if "extended_at" in trials else 0


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The trial with the lowest best validation loss."""
    ok = trials.dropna(subset=["best_val_loss"])
    return None if ok.empty else ok.loc[ok["best_val_loss"].idxmin()]


def trial_configs(run_dir: str | Path, data_dir: str | None = None) -> list[TrialConfig]:
    """The configuration of every trial of a run directory (``cae.run.record.trial_config_of``:
    its record, else what it will run; ``data_dir`` replaces where the data are read)."""
    run_dir = Path(run_dir)
    base = read_spec(run_dir).get("trial") or {}
    out = []
    for files in trial_dirs(run_dir, outcome=False):  # the configurations alone
        try:
            out.append(trial_config_of(files.record, base, files.point, data_dir))
        except (ValueError, UserError):
            continue  # a hand-edited params.json: no config to take references from
    return out

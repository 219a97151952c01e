"""A run directory -> tidy pandas frames: ``trials`` (one row per trial) and ``epochs``.

Reads what Ray Tune writes (each trial's ``params.json``, ``result.json``, ``error.txt``,
and the experiment state for statuses) plus our ``spec.yaml``, so it works on a finished,
running or interrupted run alike, without starting Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import pandas as pd

from cae.config import REPEAT_KEY, UserError, apply_point
from cae.ray_internals import EXPERIMENT_STATE, StateFormatError, read_experiment_state
from cae.rundir import (
    HISTORY_FILE,
    SCHEDULER_STOPS,
    SPEC_FILE,
    RunDirError,
    unfinished_mask,
)

TRIALS_FILE, EPOCHS_FILE = "trials.parquet", "epochs.parquet"
EPOCH_COLUMNS = ("train_loss", "val_loss", "epoch_time_s", "time_total_s")
# Ray Tune's bookkeeping fields that are not ours to keep per epoch.
_RAY_FIELDS = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "should_checkpoint",
}
_STATIC = {"params", "latent_size", "device", "node_id", "stop_reason", "best_val_loss",
           "data_loaded", "precision"}


def _read_results(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written right now
    return rows


def _statuses(run_dir: Path) -> dict[str, dict]:
    """trial dir name -> {status, trial_id, num_failures} from Ray Tune's newest experiment
    state ({} while it is being rewritten)."""
    states = sorted(run_dir.glob(EXPERIMENT_STATE.format("*")))
    if not states:
        return {}
    try:
        trials, _ = read_experiment_state(states[-1].read_text())
    except StateFormatError:
        return {}
    return {name: {"status": t.status, "trial_id": t.trial_id, "num_failures": t.num_failures}
            for name, t in trials.items()}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


@lru_cache(maxsize=4096)
def _trial_facts(config_json: str) -> dict:
    """The flat columns of one trial (cached per configuration): every setting it ran with,
    defaults included, plus params, latent size and architecture family."""
    from cae.arch import describe
    from cae.config import trial_config

    base, point = json.loads(config_json)
    try:
        cfg = trial_config(base, point)
    except (ValueError, UserError):  # a hand-edited params.json: the settings as given
        given = {k: v for k, v in point.items() if k != REPEAT_KEY}
        return _flatten(apply_point(json.loads(json.dumps(base)), given))
    m = cfg.model
    info = describe(m)
    convs = m.convs if isinstance(m.convs, int) else "-".join(map(str, m.convs))
    dump = cfg.model_dump(mode="json")
    unseeded = json.dumps({k: v for k, v in dump.items() if k != "seed"}, sort_keys=True)
    return {
        **_flatten(dump),
        # trials that differ by their seed alone (repeats) share a configuration
        "config_id": hashlib.sha1(unseeded.encode()).hexdigest()[:10],
        "params": info["params"],
        "latent_size": info["latent_size"],
        "family": f"{m.bottleneck} {len(m.channels)} stages x {convs} conv",
    }


def _error_reason(trial_dir: Path) -> str:
    path = trial_dir / "error.txt"
    if not path.is_file():
        return ""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return lines[-1] if lines else "error"


def _checkpoint_history(trial_dir: Path) -> dict:
    """What the trial's newest readable checkpoint says it has done (``cae.trainable``):
    ``epochs`` (the per-epoch metrics), ``static`` and ``final``; {} without one."""
    for path in sorted(trial_dir.glob(f"checkpoint_*/{HISTORY_FILE}"), reverse=True):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a checkpoint being written or cut short: try the one before
    return {}


def load_frames(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``trials`` and ``epochs`` frames of a run directory."""
    import yaml

    run_dir = Path(run_dir)
    spec_path = run_dir / SPEC_FILE
    if not spec_path.is_file():
        raise RunDirError(f"{run_dir} is not a cae run directory (no {SPEC_FILE} in it)")
    spec = yaml.safe_load(spec_path.read_text())
    base = spec.get("trial", {})
    scheduler = spec.get("scheduler", {}).get("kind", "asha")
    statuses = _statuses(run_dir)
    trials, epochs = [], []
    for trial_dir in sorted(p for p in run_dir.iterdir() if (p / "params.json").is_file()):
        point = json.loads((trial_dir / "params.json").read_text())
        results = _read_results(trial_dir / "result.json")
        state = statuses.get(trial_dir.name, {})
        error = _error_reason(trial_dir)
        status = state.get("status") or ("ERROR" if error else "UNKNOWN")
        trial_id = results[0]["trial_id"] if results else state.get("trial_id", trial_dir.name)
        by_epoch: dict[int, dict] = {}
        for r in results:
            if "epoch" in r:
                by_epoch[int(r["epoch"])] = r  # a resumed trial may repeat an epoch: keep last
        # epochs that result.json lost (Ray Tune rewrites it from an older copy when a trial
        # restarts from a checkpoint, and a driver crash can leave it behind) come back from
        # the trial's own checkpoint
        saved = _checkpoint_history(trial_dir)
        newest = max(by_epoch, default=0)
        for h in saved.get("epochs", []):
            by_epoch.setdefault(int(h["epoch"]), {**saved.get("static", {}), **h})
        for epoch, r in sorted(by_epoch.items()):
            row = {"trial_id": trial_id, "epoch": epoch}
            row.update({k: v for k, v in r.items()
                        if k not in _RAY_FIELDS and k not in _STATIC and k != "epoch"
                        and not k.startswith("test_")})
            row["time_total_s"] = r.get("time_total_s")
            epochs.append(row)
        last = results[-1] if results else {}
        if max(by_epoch, default=0) > newest:  # the newest epochs only in the checkpoint
            last = {**last, **by_epoch[max(by_epoch)], **(saved.get("final") or {})}
        if error and status == "TERMINATED":
            error = ""  # failed once (a lost node, a crash), then finished from its checkpoint
        vals = [r["val_loss"] for r in by_epoch.values() if _finite(r.get("val_loss"))]
        if error:
            reason = f"error: {error}"
        elif last.get("stop_reason"):
            reason = last["stop_reason"]
        elif status == "TERMINATED":
            reason = scheduler if scheduler in SCHEDULER_STOPS else "stopped"
        else:
            reason = status.lower()
        # The configuration the trial ran (its point and a variant's keys applied, defaults
        # filled in); a variant axis also as ``variant.*`` columns, which name its values.
        row = {"trial_id": trial_id, "repeat": int(point.get(REPEAT_KEY, 0)),
               **_trial_facts(json.dumps([base, point], sort_keys=True)),
               **{k: v for k, v in _flatten(point).items() if k.startswith("variant")}}
        row.update({
            "best_val_loss": min(vals) if vals else math.nan,
            "best_epoch": min(by_epoch, key=lambda e: by_epoch[e].get("val_loss", math.inf))
            if vals else 0,
            "last_val_loss": vals[-1] if vals else math.nan,
            "epochs": max(by_epoch) if by_epoch else 0,
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
            "num_failures": state.get("num_failures", 0),
            "trial_dir": trial_dir.name,
        })
        row.update({k: v for k, v in last.items() if k.startswith("test_")})
        trials.append(row)
    trials_df = pd.DataFrame(trials)
    if "test_loss" not in trials_df and len(trials_df):
        trials_df["test_loss"] = math.nan
    epochs_df = pd.DataFrame(epochs, columns=None if epochs else ["trial_id", "epoch",
                                                                   *EPOCH_COLUMNS])
    return trials_df, epochs_df


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def export(run_dir: str | Path) -> tuple[Path, Path]:
    """Write trials.parquet and epochs.parquet into the run directory.

    Lists and mappings are JSON text (``model.channels`` "[16, 32]"). A column whose trials
    hold values of different kinds (``model.convs`` 1 in one trial and [3, 4] in another;
    ``padding`` 1 or "same") is all text, since a Parquet column has one type: its numbers
    as JSON text too ("1"), so ``json.loads`` reads back every value but plain words."""
    run_dir = Path(run_dir)
    trials, epochs = load_frames(run_dir)
    for_parquet(trials).to_parquet(run_dir / TRIALS_FILE, index=False)
    for_parquet(epochs).to_parquet(run_dir / EPOCHS_FILE, index=False)
    return run_dir / TRIALS_FILE, run_dir / EPOCHS_FILE


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


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The trial with the lowest best validation loss."""
    ok = trials.dropna(subset=["best_val_loss"])
    return None if ok.empty else ok.loc[ok["best_val_loss"].idxmin()]


def trial_configs(run_dir: str | Path, data_dir: str | None = None) -> list:
    """The validated ``TrialConfig`` of every trial of a run directory (its spec's base with
    each trial's ``params.json``); ``data_dir`` replaces where the data is read from."""
    import yaml

    from cae.config import trial_config

    run_dir = Path(run_dir)
    base = (yaml.safe_load((run_dir / SPEC_FILE).read_text()) or {}).get("trial") or {}
    if data_dir:
        base.setdefault("data", {})["data_dir"] = str(Path(data_dir).expanduser().resolve())
    out = []
    for params in sorted(run_dir.glob("*/params.json")):
        try:
            out.append(trial_config(base, json.loads(params.read_text())))
        except (ValueError, UserError):
            continue  # a hand-edited params.json: no config to take references from
    return out


def summary(trials: pd.DataFrame, run_dir: str, axes: list[str] | None = None) -> str:
    """The lines ``cae sweep`` and ``cae resume`` end with: counts, the best trial (its
    values of the swept ``axes``), where the results are."""
    counts = ", ".join(f"{n} {s.lower()}" for s, n in trials["status"].value_counts().items())
    lines = [f"\ntrials: {len(trials)} ({counts}); trial-epochs: {int(trials['epochs'].sum())}"]
    best = best_trial(trials)
    if best is not None:
        keys = axes or []
        axes = {k: best[k] for k in trials.columns
                if any(k == a or k.startswith(a + ".") for a in keys) and not pd.isna(best[k])}
        lines.append(f"best trial {best['trial_id']}: val {best['best_val_loss']:.5f}, test "
                     f"{best.get('test_loss', float('nan')):.5f}, params {int(best['params']):,}, "
                     f"latent {int(best['latent_size'])}")
        if axes:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in axes.items()))
    lines.append(f"results: {run_dir}/{TRIALS_FILE} and {EPOCHS_FILE}")
    unfinished = int(unfinished_mask(trials).sum())
    if unfinished:
        lines.append(f"{unfinished} trials did not finish; continue with: cae resume {run_dir}")
    return "\n".join(lines)

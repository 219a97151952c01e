"""Which swept settings mattered: the importance of each axis of a sweep, with an interval.

Optuna's PED-ANOVA evaluator (``optuna.importance.PedAnovaImportanceEvaluator``, passed
explicitly) on an in-memory study made from ``trials.parquet``: one trial per row, its
values of the swept axes (``SweepSpec.swept``; a grid or choice axis as categories, a
random range as the range it was drawn from) and one loss that compares the trials at the
same budget (``comparable_losses``: each trial's best validation loss when every trial
was trained to its own end, else its best validation loss up to the highest rung every
trial reached; a trial that errored or diverged counts as worse than every other).
PED-ANOVA asks how differently each axis's values are spread among the
best ``TARGET_QUANTILE`` of the trials than among all of them; an axis whose values the
best trials share decides the loss. Importances are shares of the sum over the axes (they
add up to 1); the interval is the 5th to 95th percentile of the shares over bootstrap
resamples of the trials, as they come: a resample repeats some trials and leaves others
out, which can shift PED-ANOVA's share to one side, so the estimate from all the trials may
lie outside its interval (``outside_interval``; the report and ``cae status`` mark it and
say so). Below ``min_trials()`` comparable trials there is no number, only a note saying
how many are needed.

Written as ``importance.parquet`` in the run directory (``write_importance``, at the end of
a sweep and by ``cae report`` / ``cae export``), drawn in the report, printed by
``cae status --importance``; ``importance_of(RUN_DIR)`` is the notebook's way in.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cae.run.outcomes import stopped_early, trained_to_the_end, unfinished_mask

IMPORTANCE_FILE = "importance.parquet"
TARGET_QUANTILE = 0.2  # the best fifth of the trials against all of them
MIN_TOP = 5  # trials in that best fifth PED-ANOVA needs to be stable (Optuna's advice)
N_BOOT = 200  # bootstrap resamples (large runs fewer: about 10,000 resampled trials, >= 20)
INTERVAL = (5.0, 95.0)  # percentiles of the bootstrap: a 90% interval
COLUMNS = ["axis", "importance", "low", "high", "ped_anova", "method", "budget",
           "trials_used", "note"]


def min_trials() -> int:
    """Comparable trials the evaluator needs: ``MIN_TOP`` in its best ``TARGET_QUANTILE``."""
    return math.ceil(MIN_TOP / TARGET_QUANTILE)


def method_text(n_boot: int) -> str:
    import optuna

    return (f"PED-ANOVA (Optuna {optuna.__version__}): best {TARGET_QUANTILE:.0%} of the "
            f"trials against all; share of the sum over the axes; {INTERVAL[1] - INTERVAL[0]:.0f}%"
            f" interval from {n_boot} bootstrap resamples of the trials")


# ---- the loss every trial is compared by -------------------------------------------------


def comparable_losses(trials: pd.DataFrame, epochs: pd.DataFrame) -> tuple[pd.Series, str]:
    """Per trial (``trials``' index): the loss that compares it with the others at one
    budget, and what that budget is. Unfinished trials are left out; trials that errored
    or diverged (a learning rate too high, say) count as worse than every other, whatever
    loss they had reached before: their best-so-far loss would favour exactly the settings
    that fail."""
    loss = pd.to_numeric(trials.get("best_val_loss"), errors="coerce")
    failed = trials["stop_reason"].astype(str).str.startswith("error")
    keep = ~unfinished_mask(trials) & (loss.notna() | failed)
    early = stopped_early(trials) & keep
    if not early.any():
        budget = "best validation loss, every trial trained to its own end"
    else:
        rung = int(pd.to_numeric(trials.loc[early, "epochs"]).min())
        upto = epochs[epochs["epoch"] <= rung].assign(
            trial=lambda e: e["trial_id"].astype(str)).groupby("trial")["val_loss"].min()
        upto = trials["trial_id"].astype(str).map(upto)
        own = trained_to_the_end(trials) & (pd.to_numeric(trials["epochs"]) < rung)
        loss = upto.where(~own, loss)
        budget = (f"best validation loss up to epoch {rung}, the highest rung every trial "
                  "reached (the scheduler stopped some there)")
        if rung == 1:
            budget = ("validation loss of the first epoch, the first rung (the scheduler "
                      "stopped some there): the trials are compared after one epoch only")
    loss = loss[keep].astype(float)
    bad = failed[keep] | ~np.isfinite(loss)
    finite = loss[~bad]
    worst = float(finite.max()) * 10 + 1 if len(finite) else 1.0
    return loss.where(~bad, worst), budget


# ---- the study ---------------------------------------------------------------------------


def axis_values(trials: pd.DataFrame, key: str) -> pd.Series:
    """An axis's value per trial: its column, or its ``key.*`` columns joined (a variant);
    numbers stay numbers, the rest is text."""
    cols = [c for c in trials.columns if c == key or c.startswith(key + ".")]
    if cols == [key]:
        col = trials[key]
        numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        return col.astype(float) if numeric else col.astype(str)
    parts = [trials[c].map(lambda v, c=c: "" if _missing(v) or v == "{}" else
                           f"{c.removeprefix(key + '.')}={v}") for c in cols]
    if not parts:
        return pd.Series("-", index=trials.index)
    out = parts[0]
    for p in parts[1:]:
        out = out + "," + p
    return out.str.strip(",").replace("", "base")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def distributions(trials: pd.DataFrame, axes: dict[str, tuple[str, object]]) -> dict:
    """Optuna's distribution of each axis: a random range as drawn, the rest categories."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out = {}
    for key, (kind, arg) in axes.items():
        values = axis_values(trials, key)
        if kind in ("uniform", "loguniform") and values.dtype.kind == "f":
            lo, hi = float(min(arg[0], values.min())), float(max(arg[1], values.max()))
            out[key] = FloatDistribution(lo, hi, log=kind == "loguniform")
        elif kind == "randint" and values.dtype.kind == "f":
            out[key] = IntDistribution(int(min(arg[0], values.min())),
                                       int(max(arg[1] - 1, values.max())))
        else:
            out[key] = CategoricalDistribution(sorted({str(v) for v in values}))
    return out


def _ped_anova(params: list[dict], dists: dict, losses: np.ndarray) -> dict[str, float]:
    """PED-ANOVA's importance of each axis over one set of trials (raw, not normalised)."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    study = optuna.create_study(direction="minimize")
    study.add_trials([optuna.trial.create_trial(params=p, distributions=dists, value=float(v))
                      for p, v in zip(params, losses)])
    evaluator = PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE)
    with warnings.catch_warnings():  # the experimental flag, regimes of few trials
        warnings.simplefilter("ignore")
        return get_param_importances(study, evaluator=evaluator, params=list(dists),
                                     normalize=False)


def _shares(raw: dict[str, float], keys: list[str]) -> np.ndarray:
    values = np.array([max(raw.get(k, 0.0), 0.0) for k in keys])
    total = values.sum()
    return values / total if total > 0 else values


# ---- the answer --------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the importance is computed from: the swept axes, the trials that count, their
    comparable loss and what that loss is."""

    axes: dict[str, tuple[str, object]]
    trials: pd.DataFrame
    losses: pd.Series
    budget: str

    def key(self) -> str:
        """A digest of the inputs: the same digest, the same answer (not computed again)."""
        values = {k: axis_values(self.trials, k).astype(str).tolist() for k in self.axes}
        text = json.dumps([sorted(self.axes), values, [repr(v) for v in self.losses],
                           self.budget, N_BOOT, TARGET_QUANTILE, MIN_TOP, INTERVAL],
                          default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def swept_axes(spec: dict) -> dict[str, tuple[str, object]]:
    """The axes of a run's spec (as written in its ``spec.yaml``) that vary, as
    ``SweepSpec.axes`` reads them, without validating the spec: a run opens whatever this
    cae's checks have become since it ran."""
    from cae.config.spec import AXIS_KINDS

    space = spec.get("space") if isinstance(spec, dict) else None
    out = {}
    for key, value in (space if isinstance(space, dict) else {}).items():
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in AXIS_KINDS:
            out[key] = next(iter(value.items()))
    return out


def inputs(trials: pd.DataFrame, epochs: pd.DataFrame, spec: dict) -> Inputs:
    """The swept axes of ``spec`` that ``trials`` has columns for, and the trials that
    count with their comparable loss (``comparable_losses``)."""
    axes = {k: v for k, v in swept_axes(spec).items()
            if any(c == k or c.startswith(k + ".") for c in trials.columns)}
    if trials.empty:
        return Inputs(axes, trials, pd.Series(dtype=float), "")
    losses, budget = comparable_losses(trials, epochs)
    return Inputs(axes, trials.loc[losses.index], losses, budget)


def importance(trials: pd.DataFrame, epochs: pd.DataFrame, spec: dict,
               n_boot: int | None = None, seed: int = 0,
               given: Inputs | None = None) -> pd.DataFrame:
    """One row per swept axis, most important first (see the module doc); with too few
    trials or axes, the axes with no number and a note saying why. ``given``: the
    ``inputs`` already read."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inp = given or inputs(trials, epochs, spec)
    axes, budget, n = inp.axes, inp.budget, len(inp.losses)
    n_boot = n_boot or max(20, min(N_BOOT, 10_000 // max(n, 1)))
    why = _why_not(n, len(axes))
    if why:
        return _frame([{"axis": k, "method": method_text(0), "budget": budget,
                        "trials_used": n, "note": why} for k in axes] or [
            {"axis": None, "budget": budget, "trials_used": n, "note": why}], inp.key())
    dists = distributions(inp.trials, axes)
    values = {k: axis_values(inp.trials, k) for k in axes}
    params = [{k: _param(values[k].iloc[i], dists[k]) for k in axes} for i in range(n)]
    keys, y = list(axes), inp.losses.to_numpy(float)
    raw = _ped_anova(params, dists, y)
    rng = np.random.default_rng(seed)
    boots = np.array([_shares(_ped_anova([params[j] for j in pick], dists, y[pick]), keys)
                      for pick in (rng.integers(0, n, n) for _ in range(n_boot))])
    shares = _shares(raw, keys)
    low, high = (np.percentile(boots, q, axis=0) for q in INTERVAL)
    rows = [{"axis": k, "importance": s, "low": lo, "high": hi, "ped_anova": raw.get(k, 0.0),
             "method": method_text(n_boot), "budget": budget, "trials_used": n, "note": ""}
            for k, s, lo, hi in zip(keys, shares, low, high)]
    return _frame(rows, inp.key()).sort_values("importance", ascending=False, kind="stable",
                                               ignore_index=True)


OUTSIDE_NOTE = ("* the estimate from all the trials lies outside the interval of its bootstrap "
                "resamples: a resample repeats some trials and leaves others out, which "
                "shifts PED-ANOVA's share to one side here; the estimate is less certain "
                "than the interval's width says")


def outside_interval(frame: pd.DataFrame) -> pd.Series:
    """The axes whose estimate lies outside its own interval (``OUTSIDE_NOTE``)."""
    imp = frame["importance"]
    return imp.notna() & ((imp < frame["low"]) | (imp > frame["high"]))


def _param(value, dist):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return str(value)
    return int(value) if isinstance(dist, IntDistribution) else float(value)


def _why_not(n: int, n_axes: int) -> str:
    if n_axes == 0:
        return "the sweep has no swept axes to weigh"
    if n_axes == 1:
        return "the sweep has one swept axis: there is nothing to weigh it against"
    if n < min_trials():
        return (f"too few trials: PED-ANOVA needs at least {min_trials()} comparable trials "
                f"({MIN_TOP} in its best {TARGET_QUANTILE:.0%}); this run has {n}")
    return ""


def _frame(rows: list[dict], key: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS).assign(inputs_key=key)
    for col in ("importance", "low", "high", "ped_anova"):
        frame[col] = frame[col].astype(float)
    frame["trials_used"] = frame["trials_used"].astype(int)
    return frame


# ---- the file ----------------------------------------------------------------------------


def write_importance(run_dir: str | Path, trials: pd.DataFrame, epochs: pd.DataFrame,
                     spec: dict) -> Path:
    """Compute the importance of the run's axes and write ``importance.parquet`` whole,
    unless the file there was computed from the same inputs (a live report rewritten while
    no trial has ended since, ``cae report`` after the sweep's end)."""
    from cae.results.tables import parquet_bytes
    from cae.run.directory import write_file

    inp, old = inputs(trials, epochs, spec), read_importance(run_dir)
    if old is None or "inputs_key" not in old or old["inputs_key"].iloc[0] != inp.key():
        frame = importance(trials, epochs, spec, given=inp)
        write_file(run_dir, IMPORTANCE_FILE, parquet_bytes(frame))
    return Path(run_dir) / IMPORTANCE_FILE


def read_importance(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's ``importance.parquet``, or None when it has none yet."""
    path = Path(run_dir) / IMPORTANCE_FILE
    return pd.read_parquet(path) if path.is_file() else None


def importance_of(run_dir: str | Path) -> pd.DataFrame:
    """The importance of a run's swept axes, from its tables as they are now (a finished,
    running or interrupted run; a URI through its local mirror), without Ray."""
    from cae.results.tables import tables
    from cae.run import directory as rundir

    local = rundir.local_copy(str(run_dir))
    frames = tables(local)
    return importance(frames.trials, frames.epochs, rundir.read_spec(local))


def importance_text(frame: pd.DataFrame) -> str:
    """The lines of ``cae status --importance``."""
    if frame.empty:
        return "importance: no swept axes"
    first = frame.iloc[0]
    lines = [f"importance of the swept axes ({first['trials_used']} trials; "
             f"{first['budget'] or 'no comparable loss'}):"]
    if frame["importance"].isna().all():
        return "\n".join(lines + [f"  {first['note']}"])
    width = max(len(str(a)) for a in frame["axis"])
    outside = outside_interval(frame)
    for i, r in frame.iterrows():
        bar = "#" * int(round(20 * r["importance"]))
        mark = "*" if outside[i] else " "
        lines.append(f"  {str(r['axis']):<{width}}  {r['importance']:.2f}{mark}"
                     f"({r['low']:.2f}-{r['high']:.2f})  {bar}")
    lines.append(f"  {first['method']}")
    if outside.any():
        lines.append(f"  {OUTSIDE_NOTE}")
    return "\n".join(lines)

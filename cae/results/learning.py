"""Was a trial still learning when it stopped, and how much did its curve suggest was left?

Every study here was cut by a budget (``max_epochs``), and a latent size's winner that was
still improving at that budget may lose its place with more epochs. For each trial the
tables (``cae.results.tables``) carry three columns made from its validation losses:

- ``improvement_rate``: how fast its best validation loss (the lowest so far) fell over its
  last ``WINDOW`` epochs (fewer if it ran fewer), relative to that loss, per epoch
  (0.02: 2% per epoch).
- ``still_improving``: that fall was both faster than ``MIN_RATE`` per epoch and larger than
  the trial's own ``min_delta`` per epoch (its stopping rule's idea of an improvement), and
  the trial was not stopped by patience (which says it had stopped improving). A trial cut
  at its second epoch on a falling curve is still improving; one stopped by patience is
  not.
- ``remaining_gain``: how much lower its best validation loss would go, relative to where
  it stopped, if the last few epochs' improvements kept shrinking at the rate they shrank
  (a geometric series: a rough extrapolation, needing at least 3 epochs); infinite when
  they were not shrinking (no level in sight), NaN when too few epochs say nothing or the
  last epoch did not improve on the best.

``still_learning`` picks the winners that matter: the best trial at each latent size,
trained to ``max_epochs`` and still improving there, which ``cae extend`` trains on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

WINDOW = 3  # epochs whose fall of the best validation loss counts
MIN_RATE = 0.005  # a relative fall per epoch below this is a curve that has levelled off
COLUMNS = ("still_improving", "improvement_rate", "remaining_gain")


def _running_best(values: Sequence[float]) -> list[float]:
    best, out = math.inf, []
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def _remaining(best: list[float]) -> float:
    """The further fall of ``best`` (relative to its last value) if its last improvements
    keep shrinking geometrically: inf when they do not shrink, NaN with too few."""
    steps = [a - b for a, b in zip(best[-WINDOW - 1:-1], best[-WINDOW:])]
    if len(steps) < 2 or best[-1] <= 0:
        return math.nan
    first, last = steps[0], steps[-1]
    if last <= 0:
        return math.nan  # the last epoch did not improve on the best: no trend to follow
    if first <= 0:
        return math.inf
    ratio = (last / first) ** (1 / (len(steps) - 1))
    if ratio >= 1:
        return math.inf
    return last * ratio / (1 - ratio) / best[-1]


def curve_facts(val_losses: Sequence[float], min_delta: float | None,
                stop_reason: str | None) -> dict:
    """``still_improving``, ``improvement_rate`` and ``remaining_gain`` (see the module doc)
    of a trial's validation losses, epoch by epoch (finite values only)."""
    facts = {"still_improving": False, "improvement_rate": math.nan,
             "remaining_gain": math.nan}
    values = [float(v) for v in val_losses if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return facts
    best = _running_best(values)
    w = min(WINDOW, len(best) - 1)
    start, end = best[-1 - w], best[-1]
    fall = start - end
    rate = fall / start / w if start > 0 else 0.0
    delta = float(min_delta or 0.0) if not _missing(min_delta) else 0.0
    facts["improvement_rate"] = rate
    facts["still_improving"] = bool(stop_reason != "patience"
                                    and not str(stop_reason or "").startswith("error")
                                    and rate > MIN_RATE and fall > w * delta)
    facts["remaining_gain"] = _remaining(best)
    return facts


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def gain_text(row: pd.Series) -> str:
    """``-1.2%/epoch, ~4% left`` for a trial's row (``not levelling off`` when its
    improvements were not shrinking)."""
    rate = float(row.get("improvement_rate", math.nan))
    left = float(row.get("remaining_gain", math.nan))
    text = f"-{rate:.1%}/epoch" if math.isfinite(rate) else "improving"
    if math.isinf(left):
        return f"{text}, not levelling off"
    return f"{text}, ~{left:.0%} left" if math.isfinite(left) else text


def still_learning(trials: pd.DataFrame, by: str = "latent_size") -> pd.DataFrame:
    """The best trial at each value of ``by`` among those trained to their own end, kept
    when it stopped at ``max_epochs`` while still improving (best first)."""
    from cae.run.outcomes import trained_to_the_end

    if trials.empty or "still_improving" not in trials or by not in trials:
        return trials.iloc[0:0]
    loss = pd.to_numeric(trials["best_val_loss"], errors="coerce")
    done = trials[trained_to_the_end(trials) & loss.notna()]
    if done.empty:
        return done
    winners = done.loc[loss[done.index].groupby(done[by]).idxmin()]
    flagged = winners[(winners["stop_reason"].astype(str) == "max_epochs")
                      & winners["still_improving"].fillna(False).astype(bool)]
    return flagged.sort_values("best_val_loss", kind="stable")


def still_learning_lines(trials: pd.DataFrame, run_dir: str, by: str = "latent_size",
                         epochs: int | None = None) -> list[str]:
    """The lines the end of a sweep prints when winners were still improving at
    ``max_epochs``, with the command that trains them on (``epochs`` more: by default as
    many as they ran)."""
    flagged = still_learning(trials, by)
    if flagged.empty:
        return []
    more = epochs or int(pd.to_numeric(flagged["epochs"]).max())
    parts = [f"{by} {_value(r[by])} (trial {str(r['trial_id']).rsplit('_', 1)[-1]}: "
             f"{gain_text(r)})" for _, r in flagged.iterrows()]
    return [f"still improving at max_epochs, the best at {', '.join(parts)}",
            f"  train them on: cae extend {run_dir} --epochs {more} --best-per {by}"]


def _value(v) -> str:
    return f"{int(v)}" if isinstance(v, float) and v.is_integer() else str(v)

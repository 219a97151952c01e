"""The loss curves of a sweep (``loss_evolution``): every trial's validation and training
loss per epoch on log axes, the best few highlighted, a marker where each trial stopped; and
the drawing basics the report's other figures share with it (an empty figure that says why,
loss-axis ticks, the best trials' colours). A run of ``cae extend`` holds each trial's old
epochs and its new ones as one curve, marked where the new ones begin.

It takes the ``trials`` / ``epochs`` frames of ``cae.results.tables`` and returns a
``plotly.graph_objects.Figure``; it reads no files. It stays small at scale: a thousand
trials' loss curves are a few merged traces with gaps between trials, not a thousand traces,
and numeric arrays go out as float32.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cae.report.run import best_trials, short_id
from cae.run.outcomes import SCHEDULER_STOPS, unfinished_mask

# Loss axes: ticks at 1, 2, 5 of each decade, written out (0.02, not "2").
LOG_TICKS = {"dtick": "D2", "tickformat": ".2~g"}
GREY = "rgba(120, 120, 120, 0.35)"
BEST_COLORS = ("#D62728", "#1F77B4", "#2CA02C", "#FF7F0E", "#9467BD", "#8C564B", "#E377C2")


def _empty(title: str, why: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, height=200)
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig


def _positive(values: pd.Series) -> np.ndarray:
    """float32 array with non-positive or non-finite values as NaN (they break log axes)."""
    v = np.array(pd.to_numeric(values, errors="coerce"), dtype="float64")  # a copy
    v[~np.isfinite(v) | (v <= 0)] = np.nan
    return v.astype("float32")


def _merged(epochs: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All trials' curves as one x / y pair, NaN between trials, plus each point's trial."""
    e = epochs.sort_values(["trial_id", "epoch"], kind="stable")
    ids = e["trial_id"].astype(str).to_numpy()
    x = e["epoch"].to_numpy(dtype="float32")
    y = _positive(e[col])
    starts = np.flatnonzero(ids[1:] != ids[:-1]) + 1  # where a new trial begins
    x = np.insert(x, starts, np.nan)
    y = np.insert(y, starts, np.nan)
    ids = np.insert(ids.astype(object), starts, "")
    return x, y, ids


def loss_evolution(
    trials: pd.DataFrame, epochs: pd.DataFrame, n_best: int = 5, max_individual: int = 40,
) -> go.Figure:
    """Validation and training loss per epoch of every trial, on log axes.

    The ``n_best`` trials (lowest best validation loss) are coloured and named; the others
    are thin grey lines, one legend entry each (click to hide or isolate) up to
    ``max_individual`` of them, else merged into one trace per panel whose hover names the
    trial. Curves end where a trial stopped, so ASHA's early stops are visibly shorter, and
    a marker per stop reason sits on the last validation point. When the best trials'
    learning rate changes over their epochs (a schedule), it is drawn dotted on a second
    axis of the training panel.
    """
    title = "Loss evolution: every trial, the best few highlighted"
    if epochs.empty or "val_loss" not in epochs:
        return _empty(title, "no epochs reported yet")
    best = best_trials(trials, n_best)
    best_ids = [str(t) for t in best["trial_id"]]
    rates = _scheduled_rates(epochs, best_ids)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("validation loss", "training loss"),
                        specs=[[{}, {"secondary_y": rates is not None}]])
    _grey_curves(fig, epochs[~epochs["trial_id"].astype(str).isin(best_ids)], max_individual)
    _best_curves(fig, epochs, best)
    if rates is not None:
        _rate_curves(fig, rates, best)
    _stop_markers(fig, trials, epochs)
    _extension_markers(fig, trials, epochs)
    fig.update_yaxes(type="log", title_text="loss (log)", row=1, col=1, **LOG_TICKS)
    fig.update_yaxes(type="log", row=1, col=2, **LOG_TICKS)
    fig.update_xaxes(title_text="epoch", tickformat="d", rangemode="tozero")
    fig.update_layout(title=title, height=520, hovermode="closest",
                      legend=dict(groupclick="togglegroup", itemsizing="constant"))
    return fig


_PANELS = ((1, "val_loss"), (2, "train_loss"))


def _grey_curves(fig: go.Figure, rest: pd.DataFrame, max_individual: int) -> None:
    """The trials that are not among the best: thin grey lines, one legend entry each up to
    ``max_individual`` of them, else one merged trace per panel."""
    n_rest, panels = rest["trial_id"].nunique(), _PANELS
    if n_rest and n_rest <= max_individual:
        for tid, curve in rest.groupby("trial_id", sort=True):
            for col, metric in panels:
                fig.add_trace(go.Scatter(
                    x=curve["epoch"].to_numpy("float32"), y=_positive(curve[metric]),
                    mode="lines+markers", line=dict(color=GREY, width=1),
                    marker=dict(size=3, color=GREY), name=f"trial {short_id(tid)}",
                    legendgroup=f"t{tid}", showlegend=col == 1,
                    hovertemplate=f"trial {short_id(tid)}<br>epoch %{{x}}<br>%{{y:.4g}}"
                                  "<extra></extra>"), row=1, col=col)
    elif n_rest:
        for col, metric in panels:
            x, y, ids = _merged(rest, metric)
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines", line=dict(color=GREY, width=1),
                name=f"other trials ({n_rest})", legendgroup="others", showlegend=col == 1,
                connectgaps=False,
                text=[short_id(i) for i in ids] if col == 1 else None,
                hovertemplate=("trial %{text}<br>" if col == 1 else "") +
                              "epoch %{x}<br>%{y:.4g}<extra></extra>"), row=1, col=col)


def _best_curves(fig: go.Figure, epochs: pd.DataFrame, best: pd.DataFrame) -> None:
    """The best trials' curves, coloured and named by rank."""
    by_trial = dict(tuple(epochs.groupby(epochs["trial_id"].astype(str))))
    for rank, (_, row) in enumerate(best.iterrows(), start=1):
        tid = str(row["trial_id"])
        curve = by_trial.get(tid)
        if curve is None:
            continue
        curve = curve.sort_values("epoch")
        color = BEST_COLORS[(rank - 1) % len(BEST_COLORS)]
        for col, metric in _PANELS:
            fig.add_trace(go.Scatter(
                x=curve["epoch"].to_numpy("float32"), y=_positive(curve[metric]),
                mode="lines+markers", line=dict(color=color, width=2.5), marker=dict(size=5),
                name=f"#{rank} trial {short_id(tid)} (val {row['best_val_loss']:.4g})",
                legendgroup=f"t{tid}", showlegend=col == 1,
                hovertemplate=f"#{rank} trial {short_id(tid)}<br>epoch %{{x}}<br>%{{y:.4g}}"
                              "<extra></extra>"), row=1, col=col)


def _scheduled_rates(epochs: pd.DataFrame, ids: list[str]) -> pd.DataFrame | None:
    """The epochs of trials ``ids`` when their learning rate changed over them, else None."""
    if "lr" not in epochs:
        return None
    mine = epochs[epochs["trial_id"].astype(str).isin(ids)]
    varies = mine.groupby(mine["trial_id"].astype(str))["lr"].nunique(dropna=True) > 1
    return mine if varies.any() else None


def _rate_curves(fig: go.Figure, rates: pd.DataFrame, best: pd.DataFrame) -> None:
    """Each best trial's learning rate per epoch, dotted, on the training panel's second
    (log) axis, in its trial's colour and legend group."""
    by_trial = dict(tuple(rates.groupby(rates["trial_id"].astype(str))))
    for rank, (_, row) in enumerate(best.iterrows(), start=1):
        tid = str(row["trial_id"])
        if tid not in by_trial:
            continue
        curve = by_trial[tid].sort_values("epoch")
        fig.add_trace(go.Scatter(
            x=curve["epoch"].to_numpy("float32"), y=curve["lr"].to_numpy("float64"),
            mode="lines", line=dict(color=BEST_COLORS[(rank - 1) % len(BEST_COLORS)],
                                    width=1.5, dash="dot"),
            name=f"#{rank} learning rate", legendgroup=f"t{tid}", showlegend=False,
            hovertemplate=f"#{rank} trial {short_id(tid)}<br>epoch %{{x}}<br>"
                          "learning rate %{y:.3g}<extra></extra>"),
            row=1, col=2, secondary_y=True)
    fig.update_yaxes(type="log", title_text="learning rate (dotted)", row=1, col=2,
                     secondary_y=True, showgrid=False)


_STOP_STYLES = {
    "scheduler": ("stopped early by the scheduler", dict(symbol="x", size=8, color="#444")),
    "patience": ("stopped by patience", dict(symbol="circle-open", size=8, color="#444")),
    "error": ("error", dict(symbol="x-thin-open", size=11, color="#D62728",
                            line=dict(width=2, color="#D62728"))),
    "running": ("still running", dict(symbol="triangle-right", size=9, color="#17BECF")),
}


def _stop_kinds(trials: pd.DataFrame) -> dict[str, str | None]:
    """Per trial id: how it ended (error, scheduler, patience), "running" while it is
    unfinished (``cae.run.outcomes.unfinished_mask``), None for a trial that ran to max_epochs."""
    reason = trials["stop_reason"].astype(str)
    status = trials.get("status", pd.Series("", index=trials.index)).astype(str)
    running = unfinished_mask(trials)
    kinds = {}
    for tid, r, s, run in zip(trials["trial_id"].astype(str), reason, status, running):
        if r.startswith("error") or s == "ERROR":
            kinds[tid] = "error"
        elif r in SCHEDULER_STOPS:
            kinds[tid] = "scheduler"
        elif r == "patience":
            kinds[tid] = r
        else:
            kinds[tid] = "running" if run else None
    return kinds


def _stop_markers(fig: go.Figure, trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """One marker trace per stop reason at each trial's last validation point."""
    if "stop_reason" not in trials or epochs.empty:
        return
    last = epochs.sort_values("epoch").groupby(epochs["trial_id"].astype(str)).tail(1)
    last = last.assign(tid=last["trial_id"].astype(str)).set_index("tid")
    kinds = _stop_kinds(trials)
    for kind, (label, marker) in _STOP_STYLES.items():
        ids = [t for t, k in kinds.items() if k == kind and t in last.index]
        if not ids:
            continue
        pts = last.loc[ids]
        fig.add_trace(go.Scatter(
            x=pts["epoch"].to_numpy("float32"), y=_positive(pts["val_loss"]), mode="markers",
            marker=marker, name=f"{label} ({len(ids)})", legendgroup=f"stop-{kind}",
            text=[short_id(t) for t in ids],
            hovertemplate=f"trial %{{text}}: {label} after epoch %{{x}}<extra></extra>"),
            row=1, col=1)


def _extension_markers(fig: go.Figure, trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """A run of ``cae extend``: where each trial's old epochs end and the new ones begin
    (one curve holds both; the marker sits on the epoch it took over at)."""
    if "extended_at" not in trials or epochs.empty:
        return
    at = trials.dropna(subset=["extended_at"])
    if at.empty:
        return
    where = dict(zip(at["trial_id"].astype(str), at["extended_at"].astype(int)))
    e = epochs[epochs["trial_id"].astype(str).map(where) == epochs["epoch"]]
    if e.empty:
        return
    origin = dict(zip(at["trial_id"].astype(str), at["extends"].astype(str)))
    fig.add_trace(go.Scatter(
        x=e["epoch"].to_numpy("float32"), y=_positive(e["val_loss"]), mode="markers",
        marker=dict(symbol="line-ns-open", size=16, color="#444", line=dict(width=2)),
        name=f"extended from here ({len(e)})", legendgroup="extended",
        text=[origin[str(t)] for t in e["trial_id"]],
        hovertemplate="continues %{text}<br>new epochs after epoch %{x}<extra></extra>"),
        row=1, col=1)


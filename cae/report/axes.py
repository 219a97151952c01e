"""What the swept axes do: parallel coordinates over them, and each axis's effect.

``parallel_coordinates`` shows every trial as a line across the swept axes, coloured by its
error, to filter by brushing; ``axis_effects`` / ``axis_importance`` answer "how much does
this axis matter": the best (and median) error per value of the axis, continuous axes binned
into equal-count ranges, axes ordered by how far apart their values' best errors are.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cae.report.curves import LOG_TICKS, _empty
from cae.report.figures import METRIC_TITLES
from cae.report.run import (
    axis_kind,
    axis_labels,
    axis_numeric,
    error_column,
    sort_key,
    swept_axes,
)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Readable ticks (1, 2, 5 x 10^k; every digit on a narrow range) within [lo, hi]."""
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)),
                                              math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            return ticks
    return [lo, hi] if lo < hi else [lo]


def _dimension(values: pd.Series, label: str, log: bool = False) -> dict:
    """One parcoords axis: numbers as they are (log10 with readable ticks when ``log``)."""
    v = values.astype(float)
    if log and (v > 0).all():
        ticks = log_ticks(v.min(), v.max())
        return dict(label=label + " (log)", values=np.log10(v).to_numpy("float32"),
                    range=[math.log10(v.min()), math.log10(v.max())],
                    tickvals=[math.log10(t) for t in ticks], ticktext=[f"{t:.3g}" for t in ticks])
    return dict(label=label, values=v.to_numpy("float32"))


def _categorical_dimension(labels: pd.Series, label: str) -> dict:
    order = sorted(labels.unique(), key=sort_key)
    codes = labels.map({v: i for i, v in enumerate(order)})
    return dict(label=label, values=codes.to_numpy("float32"), tickvals=list(range(len(order))),
                ticktext=[o if len(o) <= 24 else o[:22] + "..." for o in order],
                range=[-0.3, len(order) - 0.7] if len(order) > 1 else [-1, 1])


def parallel_coordinates(
    trials: pd.DataFrame, spec: dict, metric: str = "best_val_loss",
) -> go.Figure:
    """Parallel coordinates over the swept axes (then latent size and the error), each
    trial a line coloured by its validation loss; drag along an axis to filter."""
    metric = error_column(trials, metric) if len(trials) else metric
    name = METRIC_TITLES.get(metric, metric)
    title = f"Swept axes, coloured by {name}"
    if trials.empty or metric not in trials:
        return _empty(title, "no trials yet")
    df = trials[pd.to_numeric(trials[metric], errors="coerce").notna()]
    if df.empty:
        return _empty(title, f"no trial has a {name} yet")
    dims = []
    for key in swept_axes(spec, df):
        numeric = axis_numeric(df, key)
        if numeric is not None and (numeric.nunique() > 8
                                    or axis_kind(spec, key) in ("uniform", "loguniform")):
            dims.append(_dimension(numeric, key, log=axis_kind(spec, key) == "loguniform"))
        else:
            dims.append(_categorical_dimension(axis_labels(df, key), key))
    same = any(axis_numeric(df, k) is not None and axis_numeric(df, k).equals(
        df["latent_size"].astype(float)) for k in swept_axes(spec, df)) \
        if "latent_size" in df else True
    if not same and (df["latent_size"] > 0).all():  # a dense latent_dim axis already is it
        lat = df["latent_size"].astype(float)
        ticks = sorted({2 ** round(math.log2(v)) for v in lat.unique()})
        dims.append(dict(label="latent size (log2)", values=np.log2(lat).to_numpy("float32"),
                         tickvals=[math.log2(t) for t in ticks], ticktext=[str(t) for t in ticks]))
    err = df[metric].astype(float)
    dims.append(_dimension(err, name, log=bool((err > 0).all())))
    fig = go.Figure(go.Parcoords(
        dimensions=dims, domain=dict(x=[0.0, 0.9]),
        line=dict(color=err.to_numpy("float32"), colorscale="Viridis", reversescale=True,
                  showscale=True, colorbar=dict(title=dict(text=name), x=1.0)),
        labelangle=0, labelside="top"))
    fig.update_layout(title=title, height=480, margin=dict(l=80, r=40, t=120, b=40))
    return fig


def _bins(values: pd.Series, log: bool, n: int = 5) -> pd.Series:
    """Labels of ``n`` equal-count bins of a continuous axis."""
    v = np.log10(values) if log else values
    cats = pd.qcut(v, q=min(n, v.nunique()), duplicates="drop")
    fmt = (lambda x: f"{10 ** x:.3g}") if log else (lambda x: f"{x:.3g}")
    return cats.map(lambda c: f"{fmt(c.left)}-{fmt(c.right)}").astype(str)


def axis_effects(trials: pd.DataFrame, spec: dict, metric: str = "best_val_loss") -> dict:
    """Per swept axis: a frame of (value, best, median, trials) and the axis's spread,
    ``(worst best - best best) / best best``: how much choosing its value can cost."""
    df = trials[pd.to_numeric(trials.get(metric), errors="coerce").notna()] \
        if metric in trials else trials.iloc[0:0]
    out = {}
    for key in swept_axes(spec, df):
        numeric = axis_numeric(df, key)
        kind = axis_kind(spec, key)
        if numeric is not None and kind in ("uniform", "loguniform", "randint") \
                and numeric.nunique() > 6:
            labels = _bins(numeric, log=kind == "loguniform")
        else:
            labels = axis_labels(df, key)
        g = df[metric].astype(float).groupby(labels)
        table = pd.DataFrame({"best": g.min(), "median": g.median(), "trials": g.size()})
        table = table.loc[sorted(table.index, key=sort_key)]
        spread = (table["best"].max() - table["best"].min()) / table["best"].min() \
            if len(table) and table["best"].min() > 0 else 0.0
        out[key] = (table, float(spread))
    return out


def axis_importance(
    trials: pd.DataFrame, spec: dict, metric: str = "best_val_loss", per_row: int = 4,
) -> go.Figure:
    """How much each swept axis matters: for every value of the axis, the best (and the
    median) error of the trials that had it; panels ordered by spread, largest first."""
    metric = error_column(trials, metric) if len(trials) else metric
    name = METRIC_TITLES.get(metric, metric)
    title = f"What each swept axis does to the {name}"
    effects = axis_effects(trials, spec, metric)
    if not effects:
        return _empty(title, "no swept axis with finished trials yet")
    order = sorted(effects, key=lambda k: -effects[k][1])
    cols = min(per_row, len(order))
    rows = math.ceil(len(order) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, shared_yaxes=True, vertical_spacing=0.25 / rows + 0.08,
        subplot_titles=[f"{k}<br><sub>spread of best {effects[k][1]:.0%}</sub>"
                        for k in order])
    for i, key in enumerate(order):
        table, _ = effects[key]
        r, c = i // cols + 1, i % cols + 1
        x = [s if len(s) <= 20 else s[:18] + "..." for s in table.index.astype(str)]
        fig.add_trace(go.Scatter(
            x=x, y=table["median"], mode="markers", name="median", legendgroup="median",
            showlegend=i == 0, marker=dict(symbol="line-ew-open", size=16, color="#888",
                                           line=dict(width=2)),
            customdata=table["trials"], hovertemplate="%{x}: median %{y:.4g} over "
                                                      "%{customdata} trials<extra></extra>"),
            row=r, col=c)
        fig.add_trace(go.Scatter(
            x=x, y=table["best"], mode="markers+lines", name="best", legendgroup="best",
            showlegend=i == 0, marker=dict(size=11, color="#D62728"),
            line=dict(color="rgba(214, 39, 40, 0.3)"),
            customdata=table["trials"], hovertemplate="%{x}: best %{y:.4g} of %{customdata}"
                                                      " trials<extra></extra>"),
            row=r, col=c)
    fig.update_yaxes(type="log", **LOG_TICKS)
    fig.update_yaxes(title_text=f"{name} (log)", col=1)
    fig.update_xaxes(type="category")
    fig.update_layout(title=title, height=330 * rows + 80, hovermode="closest")
    return fig

"""Plotly figures that answer "which architecture, which latent size" from a sweep's frames:
latent size versus error (with the Pareto front, the spread of repeats and reference
baselines), error per distortion. The loss curves are ``cae.report.curves`` (their
``loss_evolution`` is found here too, beside the other figures); what the swept axes do is
in ``cae.report.axes``.

Every builder takes the ``trials`` / ``epochs`` frames of ``cae.results.tables`` (and the spec dict
where it needs the swept axes) and returns a ``plotly.graph_objects.Figure``; none reads
files. Numeric arrays go out as float32.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cae.report.curves import BEST_COLORS, LOG_TICKS, _empty, loss_evolution
from cae.report.run import (
    best_trials,
    config_text,
    error_column,
    family_colors,
    short_id,
    swept_axes,
)
from cae.run.outcomes import stopped_early, trained_to_the_end

__all__ = ["loss_evolution", "pareto_front", "latent_vs_error", "repeat_spread",
           "distortion_errors"]

LOG2_DTICK = math.log10(2)  # log axis ticks at 1, 2, 4, 8, ...
METRIC_TITLES = {
    "best_val_loss": "best validation loss", "test_loss": "test loss",
    "last_val_loss": "last validation loss", "test_rgb_mse": "test MSE in RGB",
}


def pareto_front(trials: pd.DataFrame, metric: str = "best_val_loss") -> pd.DataFrame:
    """Trials no other beats with a latent as small or smaller: the lowest error at each
    latent size and below, in increasing latent size (so error strictly decreases). Only
    trials trained to the end take part (see ``trained_to_the_end``)."""
    df = trials[pd.to_numeric(trials[metric], errors="coerce").notna()
                & trained_to_the_end(trials)]
    df = df[df["latent_size"] > 0].sort_values(["latent_size", metric], kind="stable")
    keep, low = [], math.inf
    for idx, value in zip(df.index, df[metric].astype(float)):
        if value < low:
            keep.append(idx)
            low = value
    return df.loc[keep]


def latent_vs_error(
    trials: pd.DataFrame, spec: dict | None = None, metric: str = "best_val_loss",
    baselines: pd.DataFrame | None = None,
) -> go.Figure:
    """One point per trial: latent size (log2 x) against its error (log y), coloured by
    architecture family, with the Pareto front of the trials trained to the end and each
    point's config on hover; repeated configurations (same config, other seeds) also as
    their mean with a min-max bar; ``baselines`` (``cae.results.baselines``) as reference lines:
    PCA at each latent size, and for denoise the error of returning the distorted input.

    Families sharing a latent size are dodged slightly sideways so that none hides another;
    the hover shows the true latent size.
    """
    metric = error_column(trials, metric) if len(trials) else metric
    name = METRIC_TITLES.get(metric, metric)
    title = f"Latent size versus {name}"
    if trials.empty or "latent_size" not in trials:
        return _empty(title, "no trials yet")
    df = trials[pd.to_numeric(trials[metric], errors="coerce").notna()
                & (pd.to_numeric(trials["latent_size"], errors="coerce") > 0)]
    if df.empty:
        return _empty(title, f"no trial has a {name} yet")
    colors = family_colors(trials)
    families = sorted(df["family"].astype(str).unique())
    fig = go.Figure()
    early = _family_points(fig, df, metric, name, config_text(df, swept_axes(spec or {}, trials)),
                           colors, families)
    if early.any():
        fig.add_trace(go.Scatter(  # a legend entry only
            x=[None], y=[None], mode="markers", name=f"open: stopped early "
            f"({int(early.sum())})", marker=dict(symbol="circle-open", size=10, color="#555555",
                                                 line=dict(width=2)), hoverinfo="skip"))
    _repeat_bars(fig, df, metric, name, colors, families)
    _baseline_lines(fig, baselines, metric, df)
    front = pareto_front(df, metric)
    fig.add_trace(go.Scatter(
        x=front["latent_size"].astype("float32").to_numpy(),
        y=front[metric].astype("float32").to_numpy(), mode="lines+markers",
        line=dict(color="black", width=1.5, shape="hv", dash="dot"),
        marker=dict(symbol="diamond-open", size=14, color="black", line=dict(width=2)),
        name="Pareto front", text=front["trial_id"].map(short_id),
        hovertemplate=f"Pareto: trial %{{text}}<br>latent %{{x}}<br>{name} %{{y:.4g}}"
                      "<extra></extra>"))
    fig.update_xaxes(type="log", dtick=LOG2_DTICK, title_text="latent size (log2 scale)")
    fig.update_yaxes(type="log", title_text=f"{name} (log)", **LOG_TICKS)
    fig.update_layout(title=title, height=520, legend_title_text="family",
                      hovermode="closest")
    return fig


def _family_points(fig: go.Figure, df: pd.DataFrame, metric: str, name: str,
                   text: pd.Series, colors: dict, families: list[str]) -> pd.Series:
    """One trace of points per family (dodged sideways); returns which trials the scheduler
    stopped early: they reached their error in fewer epochs than the others, so they are
    drawn open, that a short run is not read as a worse architecture."""
    early = stopped_early(df)
    epochs_run = (df["epochs"] if "epochs" in df else pd.Series(0, index=df.index)).fillna(0)
    for i, fam in enumerate(families):
        sub = df[df["family"].astype(str) == fam]
        offset = (i - (len(families) - 1) / 2) * 0.06 if len(families) > 1 else 0.0
        fig.add_trace(go.Scatter(  # the legend entry, solid whatever the first point is
            x=[None], y=[None], mode="markers", name=fam, legendgroup=fam,
            marker=dict(color=colors.get(fam, "#999999"), size=10), hoverinfo="skip"))
        fig.add_trace(go.Scatter(
            x=(sub["latent_size"].astype(float) * 2.0 ** offset).to_numpy("float32"),
            y=sub[metric].astype("float32").to_numpy(), mode="markers", name=fam,
            legendgroup=fam, showlegend=False,
            marker=dict(color=colors.get(fam, "#999999"), size=10, opacity=0.85,
                        symbol=np.where(early.loc[sub.index], "circle-open", "circle"),
                        line=dict(width=np.where(early.loc[sub.index], 2.0, 0.5),
                                  color=np.where(early.loc[sub.index],
                                                 colors.get(fam, "#999999"), "white"))),
            customdata=np.stack([sub["trial_id"].map(short_id).to_numpy(),
                                 sub["latent_size"].astype(int).to_numpy(),
                                 epochs_run.loc[sub.index].astype(int).to_numpy(),
                                 np.where(early.loc[sub.index], " (stopped early by the scheduler)",
                                          "")], axis=1),
            text=text.loc[sub.index],
            hovertemplate=("trial %{customdata[0]}<br>latent size %{customdata[1]}<br>"
                           f"{name} %{{y:.4g}} after %{{customdata[2]}} epochs"
                           f"%{{customdata[3]}}<br>%{{text}}<extra>{fam}</extra>")))
    return early


def repeat_spread(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per configuration run more than once (``config_id``: the same settings but the
    seed): how many repeats, and the mean, min, max and std of ``metric`` over them."""
    if "config_id" not in trials or trials.empty:
        return pd.DataFrame(columns=["config_id", "n", "mean", "min", "max", "std"])
    df = trials[pd.to_numeric(trials[metric], errors="coerce").notna()]
    g = df.groupby("config_id")[metric].agg(["count", "mean", "min", "max", "std"])
    g = g.rename(columns={"count": "n"}).reset_index()
    return g[g["n"] > 1]


def _repeat_bars(fig: go.Figure, df: pd.DataFrame, metric: str, name: str,
                 colors: dict, families: list[str]) -> None:
    """Mean and min-max over the repeats of each repeated configuration."""
    spread = repeat_spread(df, metric)
    if spread.empty:
        return
    facts = df.drop_duplicates("config_id").set_index("config_id")
    spread = spread.join(facts[["latent_size", "family"]], on="config_id")
    for i, fam in enumerate(families):
        sub = spread[spread["family"].astype(str) == fam]
        if sub.empty:
            continue
        offset = (i - (len(families) - 1) / 2) * 0.06 if len(families) > 1 else 0.0
        fig.add_trace(go.Scatter(
            x=(sub["latent_size"].astype(float) * 2.0 ** offset).to_numpy("float32"),
            y=sub["mean"].to_numpy("float32"), mode="markers", legendgroup=fam,
            name=f"{fam}: mean of repeats", showlegend=False,
            marker=dict(symbol="line-ew-open", size=18, color=colors.get(fam, "#999999"),
                        line=dict(width=3)),
            error_y=dict(type="data", symmetric=False,
                         array=(sub["max"] - sub["mean"]).to_numpy("float32"),
                         arrayminus=(sub["mean"] - sub["min"]).to_numpy("float32"),
                         color=colors.get(fam, "#999999"), thickness=1.5, width=6),
            customdata=np.stack([sub["n"].astype(int), sub["min"], sub["max"],
                                 sub["std"].fillna(0)], axis=1),
            hovertemplate=(f"mean {name} %{{y:.4g}} of %{{customdata[0]}} repeats<br>"
                           "min %{customdata[1]:.4g}, max %{customdata[2]:.4g}, "
                           f"std %{{customdata[3]:.2g}}<extra>{fam}</extra>")))
    fig.add_trace(go.Scatter(  # a legend entry only
        x=[None], y=[None], mode="markers", name="bar: mean and min-max of repeats",
        marker=dict(symbol="line-ew-open", size=14, color="#555555", line=dict(width=3)),
        hoverinfo="skip"))


# References without a latent size, drawn as horizontal lines: (legend, hover, colour).
FLAT_BASELINES = {
    "identity": ("distorted input unchanged", "returning the distorted input", "#D62728"),
    "mean_chroma": ("mean chroma of the training images",
                    "colouring every image with the training images' mean chroma", "#9467BD"),
}


def _baseline_lines(fig: go.Figure, baselines: pd.DataFrame | None, metric: str,
                    df: pd.DataFrame) -> None:
    """PCA at each latent size (the best a linear autoencoder does), for denoise the error
    of the distorted input itself, for colorize that of the training images' mean chroma,
    on the split ``metric`` comes from."""
    if baselines is None or baselines.empty:
        return
    split = "test" if metric.startswith("test") else "val"
    b = baselines[baselines["split"] == split]
    pca = b[b["baseline"] == "pca"].sort_values("latent_size")
    lo, hi = float(df["latent_size"].min()), float(df["latent_size"].max())
    for (dataset, task, loss), part in pca.groupby(["dataset", "task", "loss_kind"]):
        part = part[(part["latent_size"] >= lo) & (part["latent_size"] <= hi)]
        exact = part[part["loss"] <= 0]  # as many components as pixels: PCA is the identity
        part = part[part["loss"] > 0]  # (a log axis cannot show 0)
        if not exact.empty:
            at = float(exact["latent_size"].min())
            fig.add_vline(x=at, line=dict(color="#888888", width=1, dash="dot"))
            fig.add_annotation(  # annotations on a log axis take log10 positions
                x=math.log10(at), y=1, yref="paper", yanchor="bottom", xanchor="center",
                showarrow=False, font=dict(size=11, color="#666666"),
                text=f"PCA exact from latent {at:g} ({dataset}): as large as the input")
        if part.empty:
            continue
        fig.add_trace(go.Scatter(
            x=part["latent_size"].to_numpy("float32"), y=part["loss"].to_numpy("float32"),
            mode="lines+markers", name=f"PCA ({dataset}, {split})",
            line=dict(color="#888888", width=2, dash="dash"),
            marker=dict(symbol="x", size=7, color="#888888"),
            hovertemplate=(f"PCA on {dataset}: latent %{{x}}<br>{loss} %{{y:.4g}} ({split})"
                           "<extra>linear reference</extra>")))
    for kind, (label, hover, color) in FLAT_BASELINES.items():
        for dataset, part in b[b["baseline"] == kind].groupby("dataset"):
            value = float(part["loss"].iloc[0])
            fig.add_trace(go.Scatter(
                x=[lo / 1.2, hi * 1.2], y=[value, value], mode="lines",
                name=f"{label} ({dataset})", line=dict(color=color, width=1.5, dash="dot"),
                hovertemplate=f"{hover}: %{{y:.4g}} ({split})<extra></extra>"))


def _identity_per_distortion(baselines: pd.DataFrame | None, split: str,
                             names: list[str]) -> np.ndarray | None:
    """The error of returning the distorted input, per distortion, on ``split``."""
    if baselines is None or baselines.empty:
        return None
    rows = baselines[(baselines["baseline"] == "identity") & (baselines["split"] == split)]
    cols = [f"loss_{n}" for n in names]
    if rows.empty or not set(cols) <= set(rows.columns):
        return None
    values = rows.iloc[0][cols].to_numpy(dtype=float)
    return values if np.isfinite(values).all() else None


def _per_distortion(trials: pd.DataFrame, epochs: pd.DataFrame | None,
                    n_best: int) -> tuple[pd.DataFrame, list[str], str]:
    """The best trials with one ``test_loss_<distortion>`` column per distortion, the
    distortions, and which split the errors are from: the test errors of trials that have
    them, else each trial's validation errors at its best epoch."""
    test_cols = [c for c in trials.columns if c.startswith("test_loss_")]
    names = [c.removeprefix("test_loss_") for c in test_cols]
    ranked = trials.iloc[0:0]
    if test_cols:
        ranked = best_trials(trials.dropna(subset=test_cols, how="all"), n_best)
    if not ranked.empty or epochs is None or epochs.empty:
        return ranked, names, "test"
    val_cols = [c for c in epochs.columns if c.startswith("val_loss_")]
    if not val_cols:
        return trials.iloc[0:0], [], "test"
    ranked = best_trials(trials, n_best)
    at_best = epochs.merge(ranked[["trial_id", "best_epoch"]],
                           left_on=["trial_id", "epoch"], right_on=["trial_id", "best_epoch"])
    ranked = ranked.drop(columns=[c for c in ranked if c.startswith("test_loss_")]).merge(
        at_best[["trial_id", *val_cols]].rename(
            columns={c: "test_loss_" + c.removeprefix("val_loss_") for c in val_cols}),
        on="trial_id")
    return ranked, [c.removeprefix("val_loss_") for c in val_cols], "validation (best epoch)"


def distortion_errors(
    trials: pd.DataFrame, epochs: pd.DataFrame | None = None, n_best: int = 5,
    baselines: pd.DataFrame | None = None,
) -> go.Figure | None:
    """For ``denoise`` sweeps: the best trials' error on each distortion, side by side.

    A low mean can hide a distortion the model never learned (Study B). With ``baselines``
    (``cae.results.baselines``), the error of returning the distorted input unchanged is drawn on
    each distortion and each bar says how many times that error it is (above 1x the model
    does worse than doing nothing); without, how many times the trial's mean. Uses the test
    errors of trials that have them, else each trial's validation errors at its best epoch.
    None when there are no per-distortion errors (any task but denoise).
    """
    ranked, names, source = _per_distortion(trials, epochs, n_best)
    if ranked.empty or not names:
        return None
    identity = _identity_per_distortion(baselines, "test" if source == "test" else "val", names)
    fig = go.Figure()
    for rank, (_, row) in enumerate(ranked.iterrows(), start=1):
        values = np.array([row.get(f"test_loss_{n}", np.nan) for n in names], dtype=float)
        mean = np.nanmean(values) if np.isfinite(values).any() else np.nan
        ref = identity if identity is not None else np.full(len(names), mean)
        fig.add_trace(go.Bar(
            x=names, y=values.astype("float32"),
            name=f"#{rank} trial {short_id(row['trial_id'])} (mean {mean:.4g})",
            marker_color=BEST_COLORS[(rank - 1) % len(BEST_COLORS)],
            text=[f"{v / r:.1f}x" if r > 0 and np.isfinite(v) else "" for v, r in zip(values, ref)],
            textposition="outside",
            hovertemplate="%{x}: %{y:.4g} (%{text} " + ("the distorted input's error"
                          if identity is not None else "the trial's mean")
                          + ")<extra>%{fullData.name}</extra>"))
    if identity is not None:
        fig.add_trace(go.Scatter(
            x=names, y=identity.astype("float32"), mode="markers",
            name="returning the distorted input",
            marker=dict(symbol="line-ew", size=60, line=dict(width=3, color="#D62728")),
            hovertemplate="%{x}: returning the distorted input %{y:.4g}<extra></extra>"))
    fig.update_layout(
        title=f"Error per distortion, best {len(ranked)} trials ({source} set); labels: "
              + ("times the distorted input's own error (>1x: worse than doing nothing)"
                 if identity is not None else "times the trial's mean"),
        barmode="group", height=460, xaxis_title="distortion",
        yaxis_title=f"MSE on the {source.split()[0]} set", legend_title_text="trial")
    return fig

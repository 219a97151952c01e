"""Which fused pack trained which trial when: a figure of a fused sweep's ``epochs`` table
(its ``pack`` column), for the report. Under successive halving the survivors of each rung
are regrouped into new packs, so a trial's epochs span several packs; a trial trained alone
has no pack."""

from __future__ import annotations

import re

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go


def pack_id(name: str) -> str:
    """A pack's Tune trial id, from its directory's name (``run_pack_<id>_<n>_...``)."""
    match = re.search(r"_([0-9a-f]{8})_\d+_", str(name))
    return match.group(1) if match else str(name)


def has_packs(epochs: pd.DataFrame) -> bool:
    """Whether any epoch of the run was trained in a fused pack."""
    return "pack" in epochs and epochs["pack"].notna().any()


def pack_spans(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per (trial, pack): its first and last epoch in that pack, how many trials
    that pack trained, the trial's latent size; in the order the figure draws them (latent
    size, then the longest-trained trials first)."""
    e = epochs.dropna(subset=["pack"]).astype({"trial_id": str})
    spans = e.groupby(["trial_id", "pack"], sort=False)["epoch"].agg(["min", "max"])
    spans = spans.reset_index().rename(columns={"min": "first", "max": "last"})
    spans["members"] = spans["pack"].map(e.groupby("pack")["trial_id"].nunique())
    info = trials.astype({"trial_id": str}).set_index("trial_id")
    spans["latent_size"] = spans["trial_id"].map(info["latent_size"]).fillna(0).astype(int)
    spans["epochs"] = spans["trial_id"].map(info["epochs"]).fillna(0).astype(int)
    return spans.sort_values(["latent_size", "epochs", "trial_id", "first"],
                             ascending=[True, False, True, True], kind="stable")


def pack_timeline(trials: pd.DataFrame, epochs: pd.DataFrame) -> go.Figure:
    """A bar per trial and pack over the epochs that pack trained it, one colour per pack:
    where a trial's bar changes colour, it went on in another pack."""
    spans = pack_spans(trials, epochs)
    packs = list(dict.fromkeys(spans["pack"]))
    palette = px.colors.qualitative.Dark24
    colour = {p: palette[i % len(palette)] for i, p in enumerate(packs)}
    labels = [f"{t} (latent {n})" for t, n in zip(spans["trial_id"], spans["latent_size"])]
    hover = [f"trial {t}: epochs {a}-{b} in pack {pack_id(p)} "
             f"({m} trials trained in it)" for t, p, a, b, m in zip(
                 spans["trial_id"], spans["pack"], spans["first"], spans["last"],
                 spans["members"])]
    fig = go.Figure(go.Bar(
        y=labels, base=(spans["first"] - 1).tolist(),
        x=(spans["last"] - spans["first"] + 1).tolist(), orientation="h",
        marker={"color": [colour[p] for p in spans["pack"]], "line": {"width": 0.5,
                                                                      "color": "white"}},
        hovertext=hover, hoverinfo="text", showlegend=False))
    rows = len(dict.fromkeys(labels))
    fig.update_layout(
        title=f"Which pack trained which trial ({len(packs)} packs, {rows} trials)",
        xaxis_title="epoch", barmode="overlay", height=max(320, 18 * rows + 120),
        yaxis={"autorange": "reversed", "type": "category"}, margin={"l": 200})
    return fig

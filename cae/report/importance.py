"""The importance of a sweep's axes as bars with their intervals (``cae.results.importance``):
plain HTML bars in the report (``importance_html``), a Plotly figure with one group of bars
per run for ``cae compare`` (``importance_bars``).

Takes the frame of ``importance.parquet``; where it holds no number (too few trials, one
axis) the section is its note instead of a figure, never a bar the evaluator cannot
support.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from cae.report.curves import BEST_COLORS
from cae.results.importance import OUTSIDE_NOTE, outside_interval


def has_numbers(frame: pd.DataFrame | None) -> bool:
    return frame is not None and not frame.empty and frame["importance"].notna().any()


def importance_bars(frames: dict[str, pd.DataFrame], title: str | None = None) -> go.Figure:
    """Horizontal bars of each axis's importance with its interval, one colour per run
    (``frames``: run name -> its importance frame; frames without numbers left out)."""
    shown = {name: f for name, f in frames.items() if has_numbers(f)}
    order = _axis_order(shown)
    fig = go.Figure()
    for i, (name, frame) in enumerate(shown.items()):
        f = frame.dropna(subset=["importance"]).set_index("axis").reindex(order)
        # an estimate outside its interval (OUTSIDE_NOTE): the whiskers reach the interval's
        # far end only, and the hover says so
        outside = outside_interval(f.reset_index()).to_numpy()
        fig.add_trace(go.Bar(
            y=order, x=f["importance"].to_numpy("float32"), orientation="h",
            name=name, marker_color=BEST_COLORS[i % len(BEST_COLORS)],
            marker_pattern_shape=["/" if o else "" for o in outside],
            error_x=dict(type="data", symmetric=False,
                         array=(f["high"] - f["importance"]).clip(lower=0).to_numpy("float32"),
                         arrayminus=(f["importance"] - f["low"]).clip(lower=0)
                         .to_numpy("float32")),
            customdata=[[lo, hi, "<br>outside its interval (hatched)" if o else ""]
                        for lo, hi, o in zip(f["low"], f["high"], outside)],
            hovertemplate=f"{html.escape(name)}<br>%{{y}}: %{{x:.2f}} (%{{customdata[0]:.2f}}"
                          "-%{customdata[1]:.2f})%{customdata[2]}<extra></extra>"))
    first = next(iter(shown.values()), None)
    fig.update_layout(
        title=title or "Importance of each swept axis (PED-ANOVA, with its bootstrap interval)",
        barmode="group", height=180 + 40 * len(order) * max(1, len(shown)),
        xaxis=dict(title="importance (share of the sum over the axes)", range=[0, 1.05]),
        yaxis=dict(autorange="reversed"), showlegend=len(shown) > 1,
        margin=dict(l=10, r=10, t=60, b=40))
    if first is not None:
        fig.add_annotation(text=html.escape(str(first["budget"].iloc[0])), showarrow=False,
                           x=0, y=1.02, xref="paper", yref="paper", xanchor="left",
                           yanchor="bottom", font=dict(size=11, color="#666"))
    return fig


def importance_html(frame: pd.DataFrame) -> str:
    """One run's importance as plain HTML bars (no script: the report's section): per axis
    a bar of its share, a line over its interval, and the numbers."""
    rows = []
    shown = frame.dropna(subset=["importance"])
    outside = outside_interval(shown)
    for i, r in shown.iterrows():
        share, low, high = (max(0.0, min(1.0, float(r[k]))) for k in ("importance", "low",
                                                                       "high"))
        mark = "*" if outside[i] else ""
        bar = (f'<div class="imp"><span class="bar" style="width:{share:.1%}"></span>'
               f'<span class="ci" style="left:{low:.1%};width:{high - low:.1%}"></span></div>')
        rows.append(f"<tr><td>{html.escape(str(r['axis']))}</td><td>{bar}</td>"
                    f"<td>{share:.2f}{mark}</td><td>{low:.2f}-{high:.2f}</td></tr>")
    note = f'<p class="note">{html.escape(OUTSIDE_NOTE)}.</p>' if outside.any() else ""
    return (f"<style>{IMPORTANCE_CSS}</style>"
            '<table class="best importance"><tr><th>axis</th><th>importance</th>'
            '<th>share</th><th>interval</th></tr>' + "".join(rows) + "</table>" + note)


IMPORTANCE_CSS = """
table.importance td { vertical-align: middle; }
.imp { position: relative; width: 420px; height: 16px; background: #f0f1f6; }
.imp .bar { position: absolute; left: 0; top: 2px; height: 12px; background: #636EFA; }
.imp .ci { position: absolute; top: 7px; height: 2px; background: #222; }
"""


def _axis_order(frames: dict[str, pd.DataFrame]) -> list[str]:
    """Axes by their highest importance in any run, most important first."""
    best: dict[str, float] = {}
    for f in frames.values():
        for axis, value in zip(f["axis"], f["importance"]):
            if pd.notna(value):
                best[str(axis)] = max(best.get(str(axis), 0.0), float(value))
    return sorted(best, key=lambda a: -best[a])


def notes_html(frames: dict[str, pd.DataFrame]) -> str:
    """The notes of the runs whose frame has no number, one paragraph each."""
    out = []
    for name, f in frames.items():
        if f is None or has_numbers(f) or f.empty:
            continue
        who = f"{html.escape(name)}: " if len(frames) > 1 else ""
        out.append(f'<p class="note">{who}no importance: {html.escape(str(f["note"].iloc[0]))}'
                   "</p>")
    return "\n".join(out)


def method_html(frame: pd.DataFrame | None) -> str:
    """What the numbers are: the evaluator, the interval and how many trials."""
    if not has_numbers(frame):
        return ""
    first = frame.iloc[0]
    return (f'<p class="sub">{html.escape(str(first["method"]))}; '
            f'{int(first["trials_used"])} trials.</p>')

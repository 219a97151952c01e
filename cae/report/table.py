"""The table of all trials, like the studies' hand-typed tables, but complete and sortable.

``table_frame`` picks and orders the columns (trial, swept axes, model facts, losses,
epochs, status); ``trials_table`` shows it as a Plotly table (for notebooks);
``table_html`` renders it as a plain HTML table that sorts on a click on its header (for the
report: a thousand rows stay small and fast as HTML, and the sort needs no library).
"""

from __future__ import annotations

import html
import math

import pandas as pd
import plotly.graph_objects as go

from cae.report.figures import repeat_spread
from cae.report.run import axis_labels, short_id, swept_axes
from cae.results.learning import gain_text
from cae.run.outcomes import trained_to_the_end

_FACTS = ("family", "params", "latent_size")
_LOSSES = ("best_val_loss", "best_epoch", "last_val_loss", "test_loss")
_RUN = ("epochs", "status", "stop_reason", "wall_time_s", "num_failures")


def table_frame(trials: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """One row per trial, best validation loss first: id, swept axes (as readable labels),
    family, params, latent size, losses (per distortion too), epochs, status, stop reason,
    wall time."""
    if trials.empty:
        return pd.DataFrame(columns=["trial"])
    out = pd.DataFrame(index=trials.index)
    out["trial"] = trials["trial_id"].map(short_id)
    for key in swept_axes(spec, trials):
        out[key] = axis_labels(trials, key)
    extra = sorted(c for c in trials.columns if c.startswith("test_") and c != "test_loss")
    for col in (*_FACTS, *_LOSSES, *extra, *_RUN):
        if col in trials:
            out[col] = trials[col]
    spread = repeat_spread(trials, "best_val_loss")
    if not spread.empty:  # configurations run several times, with other seeds
        by = spread.set_index("config_id")
        ids = trials["config_id"]
        out.insert(1, "repeat", trials["repeat"])
        out["repeats"] = ids.map(by["n"]).fillna(1).astype(int)
        out["mean_of_repeats"] = ids.map(by["mean"])
        out["std_of_repeats"] = ids.map(by["std"])
    if "best_val_loss" in out:
        out = out.sort_values("best_val_loss", kind="stable", na_position="last")
    return out.reset_index(drop=True)


def best_per_latent(trials: pd.DataFrame, spec: dict,
                    baselines: pd.DataFrame | None = None) -> pd.DataFrame:
    """Like the studies' tables: at each latent size, the best trial among those trained to
    the end (its swept axes, params, validation and test error, epochs), how many trials of
    that size ran to the end, the spread over the winner's repeats, and the PCA reference at
    that size (with the winner's error relative to it: below 1 beats PCA; "PCA exact" where
    the latent is as large as the input, so PCA reproduces it without error); a winner that
    stopped at max_epochs while still improving says so (``cae.results.learning``)."""
    cols = ["latent_size", "trained_to_end", "trial"]
    if trials.empty or "latent_size" not in trials:
        return pd.DataFrame(columns=cols)
    axes = [a for a in swept_axes(spec, trials) if a != "model.latent_dim"]
    done = trials[trained_to_the_end(trials)
                  & pd.to_numeric(trials["best_val_loss"], errors="coerce").notna()]
    spread = repeat_spread(trials, "best_val_loss").set_index("config_id")
    pca = None
    if baselines is not None and not baselines.empty:
        b = baselines[(baselines["baseline"] == "pca") & (baselines["split"] == "val")]
        pca = b.groupby("latent_size")["loss"].min()
    rows = []
    for latent, group in trials.groupby("latent_size"):
        ran = done[done["latent_size"] == latent]
        row = {"latent_size": int(latent), "trained_to_end": f"{len(ran)} of {len(group)}"}
        if not ran.empty:
            best = ran.loc[ran["best_val_loss"].idxmin()]
            row["trial"] = short_id(best["trial_id"])
            for a in axes:
                row[a] = axis_labels(ran.loc[[best.name]], a).iloc[0]
            for c in ("params", "best_val_loss", "test_loss", "epochs"):
                row[c] = best.get(c)
            if _still_improving(best):  # at max_epochs: more epochs may change the order
                row["still improving"] = gain_text(best)
            cid = best.get("config_id")
            if cid in spread.index:
                s = spread.loc[cid]
                row["repeats"] = int(s["n"])
                row["val mean of repeats"] = s["mean"]
                row["val min-max of repeats"] = f"{s['min']:.4g}-{s['max']:.4g}"
            if pca is not None and float(latent) in pca.index:
                row["PCA val"] = float(pca.loc[float(latent)])
                # a latent as large as the input: PCA keeps every pixel, its error is 0
                row["vs PCA"] = (float(best["best_val_loss"]) / row["PCA val"]
                                 if row["PCA val"] > 0 else "PCA exact")
        rows.append(row)
    return pd.DataFrame(rows)


def _still_improving(best: pd.Series) -> bool:
    flag = best.get("still_improving")
    return str(best.get("stop_reason")) == "max_epochs" and bool(flag) and not pd.isna(flag)


def frame_html(df: pd.DataFrame, css: str = "best") -> str:
    """A small frame as a plain HTML table."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def _fmt(value) -> str:
    if value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str)
                         and pd.isna(value)):
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):d}"
        return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.3e}"
    return str(value)


def trials_table(trials: pd.DataFrame, spec: dict) -> go.Figure:
    """All trials as a Plotly table, best validation loss first."""
    df = table_frame(trials, spec)
    fig = go.Figure(go.Table(
        header=dict(values=[f"<b>{c}</b>" for c in df.columns], align="left",
                    fill_color="#EEF"),
        cells=dict(values=[[_fmt(v) for v in df[c].tolist()] for c in df.columns],
                   align="left", height=22)))
    fig.update_layout(title=f"All {len(df)} trials, best validation loss first",
                      height=min(900, 120 + 24 * max(len(df), 1)),
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var i = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var num = th.classList.contains('num');
    var key = function (tr) {
      var t = tr.children[i].textContent;
      if (!num) return t;
      var v = parseFloat(t.replace(/,/g, ''));
      return isNaN(v) ? (asc ? Infinity : -Infinity) : v;
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      var c = num ? x - y : String(x).localeCompare(String(y), undefined, {numeric: true});
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def table_html(trials: pd.DataFrame, spec: dict, table_id: str = "trials") -> str:
    """The trials table as an HTML ``<table class="sortable">``; a click on a header sorts
    by that column (numbers numerically), a second click reverses. Needs ``SORT_JS``."""
    df = table_frame(trials, spec)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               for c in df.columns]
    head = "".join(
        f'<th class="{"num" if n else "txt"}" title="click to sort">{html.escape(str(c))}</th>'
        for c, n in zip(df.columns, numeric))
    body = []
    for row in df.itertuples(index=False):
        cells = "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row)
        body.append(f"<tr>{cells}</tr>")
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')

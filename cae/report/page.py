"""One self-contained HTML page per sweep: ``cae report RUN_DIR [-o FILE]``.

The page works offline: plotly.js is embedded once, in the head, and every figure is a
``<div>`` plus a few lines of JSON and script. It opens with a header (sweep, trials by
status, trial-epochs and compute time, the best config), then the figures of
``cae.report.figures``, the pictures of the best trials, and a sortable table of all trials.
It reads whatever the run directory holds now, so it works on a finished, running or
interrupted run.
"""

from __future__ import annotations

import html
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from cae.data.userdata import skipped_note
from cae.report import axes, figures
from cae.report.packs import has_packs, pack_timeline
from cae.report.run import Run, axis_labels, best_trials, load_run, short_id
from cae.report.table import SORT_JS, best_per_latent, frame_html, table_html
from cae.results.tables import carried_epochs, trained_epochs
from cae.run.directory import write_file
from cae.run.outcomes import trained_to_the_end, unfinished_mask

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 40px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin: 0 0 12px; }
.facts { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.fact { background: #f5f6fa; border-radius: 6px; padding: 10px 14px; min-width: 150px; }
.fact b { display: block; font-size: 1.35em; }
.note { background: #fff6e0; border-left: 4px solid #f0b400; padding: 8px 12px; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right;
         white-space: nowrap; }
th { background: #eef; position: sticky; top: 0; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: ' \\25B2'; }
th[aria-sort=descending]::after { content: ' \\25BC'; }
table.best td:first-child, table.best th { text-align: left; }
.scroll { max-height: 720px; overflow: auto; border: 1px solid #ddd; }
"""

PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def _duration(seconds: float) -> str:
    if not seconds or not math.isfinite(seconds):
        return "0 s"
    s = int(round(seconds))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _fig_html(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                       default_width="100%")


def _fact(label: str, value: str) -> str:
    return f'<div class="fact">{html.escape(label)}<b>{html.escape(value)}</b></div>'


def header_html(run: Run) -> str:
    """Sweep name, trials by status, trial-epochs, compute time, the best config."""
    t, spec = run.trials, run.spec
    trial = spec.get("trial") or {}
    data = trial.get("data") or {}
    dataset = f"{data.get('dataset', '?')}" + (f" ({data['path']})" if data.get("path") else "")
    sched = (spec.get("scheduler") or {}).get("kind", "asha")
    parts = [f"<h1>Sweep {html.escape(str(spec.get('name', run.name)))}</h1>",
             f'<p class="sub">run <code>{html.escape(str(run.path or run.name))}</code>; task '
             f"{html.escape(run.task)} on {html.escape(str(dataset))}; scheduler "
             f"{html.escape(sched)}; swept axes: {html.escape(', '.join(run.axes) or 'none')}"
             f"; report made {datetime.now():%Y-%m-%d %H:%M}</p>"]
    n = len(t)
    statuses = t["status"].value_counts() if n else pd.Series(dtype=int)
    reasons = t["stop_reason"].astype(str).str.split(":").str[0].value_counts() if n else {}
    facts = [
        _fact("trials", f"{n}"),
        _fact("by status", ", ".join(f"{c} {s.lower()}" for s, c in statuses.items()) or "-"),
        _fact("stopped by", ", ".join(f"{c} {r}" for r, c in reasons.items()) or "-"),
        _fact("trial-epochs", f"{trained_epochs(t):,}" + (
            f" (besides {carried:,} carried over from the trials extended)"
            if (carried := carried_epochs(t)) else "")),
        _fact("compute time (sum of trials)",
              _duration(float(t["wall_time_s"].fillna(0).sum()) if n else 0.0)),
    ]
    if n:
        facts.append(_fact("trained to the end", _ends_per_stratum(run)))
    parts.append(f'<div class="facts">{"".join(facts)}</div>')
    skipped = skipped_note(data)  # a user's folder: the unreadable files left out
    if skipped:
        parts.append(f'<p class="note">{html.escape(skipped)}</p>')
    unfinished = int(unfinished_mask(t).sum()) if n else 0
    if unfinished or n == 0:
        parts.append(
            f'<p class="note">{unfinished} of {n} trials have not finished: the run is still '
            "going or was interrupted (<code>cae resume RUN_DIR</code> continues it). This "
            "report shows what had been reported when it was made.</p>")
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in run.notes]
    parts.append(_best_html(run))
    return "\n".join(parts)


def _ends_per_stratum(run: Run) -> str:
    """How many trials of each stratum (``scheduler.stratify``'s values, else each latent
    size) ran to their own end, neither stopped early nor unfinished."""
    t = run.trials
    keys = [k for k in (run.spec.get("scheduler") or {}).get("stratify") or [] if k in t]
    keys = keys or (["latent_size"] if "latent_size" in t else [])
    done = trained_to_the_end(t)
    if not keys:
        return f"{int(done.sum())} of {len(t)}"
    parts = []
    for value, group in t.groupby(keys):
        value = value if isinstance(value, tuple) else (value,)
        label = ", ".join(f"{k.removeprefix('model.')} {v}" for k, v in zip(keys, value))
        parts.append(f"{label}: {int(done.loc[group.index].sum())}/{len(group)}")
    return "; ".join(parts)


def _best_html(run: Run) -> str:
    best = best_trials(run.trials, 1)
    if best.empty:
        return "<p>No trial has reported a validation loss yet.</p>"
    row = best.iloc[0]
    cells = [("trial", short_id(row["trial_id"]))]
    cells += [(k, axis_labels(best, k).iloc[0]) for k in run.axes]
    for key, fmt in (("family", "{}"), ("params", "{:,.0f}"), ("latent_size", "{:.0f}"),
                     ("best_val_loss", "{:.5g}"), ("test_loss", "{:.5g}"),
                     ("best_epoch", "{:.0f}"), ("epochs", "{:.0f}"), ("stop_reason", "{}")):
        if key in row and not pd.isna(row[key]):
            cells.append((key, fmt.format(row[key])))
    head = "".join(f"<th>{html.escape(k)}</th>" for k, _ in cells)
    body = "".join(f"<td>{html.escape(str(v))}</td>" for _, v in cells)
    return (f'<h3>Best config (lowest validation loss)</h3><div class="scroll" style="max-height:'
            f'none"><table class="best"><tr>{head}</tr><tr>{body}</tr></table></div>')


def sections(run: Run, pictures: bool = True,
             n_best: int = 5) -> list[tuple[str, str, str, str]]:
    """(anchor, title, explanation, figure html) for every part of the report."""
    t, e, spec = run.trials, run.epochs, run.spec
    out = [
        ("loss", "Loss evolution",
         f"Validation and training loss per epoch of every trial (log scale). The {n_best} "
         "best are coloured; curves end where a trial stopped, so the scheduler's early stops "
         "are the short ones. Click a legend entry to hide it, double-click to isolate it.",
         _fig_html(figures.loss_evolution(t, e, n_best=n_best))),
        ("best-latent", "Best per latent size",
         "At each latent size, the best trial among those trained to the end (early-stopped "
         "ones reached their error in fewer epochs), beside the PCA reference at that size "
         "(vs PCA below 1: the autoencoder beats the best linear one)." + _learning_text(run),
         f'<div class="scroll" style="max-height:none">'
         f'{frame_html(best_per_latent(t, spec, run.baselines))}</div>'),
        ("latent", "Latent size versus error",
         "One point per trial, coloured by architecture family; open points are trials the "
         "scheduler stopped early (their error is from fewer epochs); the dotted step line is "
         "the Pareto front of the trials trained to the end (the lowest error at each latent "
         "size and below); the dashed grey line is PCA at each latent size (the best linear "
         "autoencoder), and for denoise the red dotted line the error of returning the "
         "distorted input. Bars: mean and min-max over the repeats of a configuration. Hover "
         "a point for its config.",
         _fig_html(figures.latent_vs_error(t, spec, baselines=run.baselines))),
        ("axes", "Swept axes",
         "How much each swept axis matters: for each value, the best and the median error of "
         "the trials with it. A wide spread of the best means the axis matters.",
         _fig_html(axes.axis_importance(t, spec))),
        ("importance", "Which settings mattered",
         "The swept axes weighed against each other: PED-ANOVA (Optuna) asks how differently "
         "each axis's values are spread among the best fifth of the trials than among all; "
         "an axis the best trials agree on decides the loss. Bars: each axis's share of the "
         "sum; the black line over each, its interval over bootstrap resamples of the "
         "trials.", _importance_html(run)),
        ("parallel", "Parallel coordinates",
         "Over the swept axes, coloured by validation loss; drag along an axis to keep only "
         "the trials in that range.",
         _fig_html(axes.parallel_coordinates(t, spec))),
    ]
    dist = figures.distortion_errors(t, e, n_best=n_best, baselines=run.baselines)
    if dist is not None:
        out.append(("distortions", "Error per distortion",
                    "The best trials on each distortion, beside the error of returning the "
                    "distorted input unchanged (red): a low mean can hide a distortion the "
                    "model never learned to undo, or undoes worse than doing nothing.",
                    _fig_html(dist)))
    if has_packs(e):
        out.append(_packs_section(t, e))
    if pictures and run.path is not None:
        from cae.report.pictures import sample_pictures

        out.append(("pictures", "Pictures",
                    "The best trials on their test samples: the best, median and worst sample "
                    "by its own squared error, beside the target.",
                    _fig_html(sample_pictures(run.path, t, spec, data_dir=run.data_dir))))
    out.append(("table", "All trials",
                "Best validation loss first; click a column header to sort by it.",
                f'<div class="scroll">{table_html(t, spec)}</div>'))
    return out


def _packs_section(trials: pd.DataFrame, epochs: pd.DataFrame) -> tuple[str, str, str, str]:
    """The section of a fused sweep: which pack trained which trial when."""
    return ("packs", "Fused packs",
            "Which pack trained which trial, epoch by epoch (one colour per pack). Under "
            "successive halving each rung's survivors go on in new packs, as full as the "
            "sweep's max_members allows; a pack's members train alike, each on its own "
            "batches, as it would alone. Hover a bar for its pack.",
            _fig_html(pack_timeline(trials, epochs)))


def _importance_html(run: Run) -> str:
    """The importance section: the run's ``importance.parquet`` (computed from its tables
    when it has none), as bars, or the note saying why there is no number."""
    from cae.report.importance import has_numbers, importance_html, method_html, notes_html
    from cae.results.importance import importance, read_importance

    frame = read_importance(run.path) if run.path is not None else None
    if frame is None:
        frame = importance(run.trials, run.epochs, run.spec)
    if not has_numbers(frame):
        return notes_html({run.name: frame}) or "<p>No swept axes.</p>"
    return method_html(frame) + importance_html(frame)


def _learning_text(run: Run) -> str:
    """What the table's ``still improving`` column means, when a winner has it."""
    from cae.results.learning import still_learning_lines

    lines = still_learning_lines(run.trials, str(run.path or "RUN_DIR"))
    if not lines:
        return ""
    return (" Winners marked 'still improving' stopped at max_epochs while their validation "
            "loss was still falling, so more epochs may change the order; "
            f"{lines[1].strip()} trains them on.")


def build_report(run: Run, pictures: bool = True, n_best: int = 5) -> str:
    """The whole page as one HTML string (plotly.js embedded once, no network needed)."""
    from plotly.offline import get_plotlyjs

    parts = sections(run, pictures=pictures, n_best=n_best)
    nav = " ".join(f'<a href="#{a}">{html.escape(title)}</a>' for a, title, _, _ in parts)
    body = "\n".join(
        f'<section id="{a}"><h2>{html.escape(title)}</h2>'
        f'<p class="sub">{html.escape(text)}</p>\n{fig}</section>'
        for a, title, text, fig in parts)
    title = html.escape(f"cae sweep report: {run.spec.get('name', run.name)}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title}</title><style>{CSS}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head><body>\n'
        f"{header_html(run)}\n<nav>{nav}</nav>\n{body}\n<script>{SORT_JS}</script>\n"
        "</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None,
                 pictures: bool = True, data_dir: str | None = None,
                 run: Run | None = None) -> Path:
    """Build the report of a run directory and write it (default ``RUN_DIR/report.html``).

    ``data_dir`` overrides where the pictures read the dataset (by default where the sweep
    read it, as its spec records). The file is written beside its final name and then
    renamed, so a browser reloading it never sees half a page.
    """
    run = run if run is not None else load_run(run_dir)
    if data_dir:
        run.data_dir = data_dir
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    write_file(out.parent, out.name, build_report(run, pictures=pictures).encode("utf-8"))
    return out

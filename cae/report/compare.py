"""Runs side by side: ``cae compare RUN_DIR... -o compare.html``, and ``cae.load_runs`` for
the notebook.

The same grid on two datasets, or a sweep before and after a change of its base trial: the
page lists what differs between the runs' specs at the top, then draws, one colour per run,
the best trial at each latent size beside that run's PCA reference, the loss curves of
those winners, and each run's importance of its swept axes (``cae.results.importance``).
Errors of runs on different datasets or tasks are not on one scale, so then every error is
divided by its own run's PCA error at the same latent size (below 1: better than the best
linear autoencoder), and the page says so. Reads the runs' tables without Ray.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from cae.report.curves import BEST_COLORS, LOG_TICKS, _empty, _positive
from cae.report.importance import has_numbers, importance_bars, notes_html
from cae.report.run import Run, load_run
from cae.report.table import best_per_latent, frame_html
from cae.run.outcomes import trained_to_the_end


@dataclass
class Runs:
    """Several runs, each under a name of its own (its directory's, made unique)."""

    runs: dict[str, Run]
    importance: dict[str, pd.DataFrame] = field(default_factory=dict)

    def _stacked(self, part: str) -> pd.DataFrame:
        frames = [getattr(r, part).assign(run=name) for name, r in self.runs.items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def trials(self) -> pd.DataFrame:
        """Every run's trials, with a ``run`` column."""
        return self._stacked("trials")

    @property
    def epochs(self) -> pd.DataFrame:
        """Every run's epochs, with a ``run`` column."""
        return self._stacked("epochs")

    def kinds(self) -> dict[str, str]:
        """Each run's dataset and task (``fashion_mnist / denoise``)."""
        return {name: f"{_dataset(r)} / {r.task}" for name, r in self.runs.items()}

    @property
    def by_ratio(self) -> bool:
        """Whether the runs differ in dataset or task: then errors are compared by their
        ratio to each run's own PCA error."""
        return len(set(self.kinds().values())) > 1

    def best(self) -> pd.DataFrame:
        """The best trial at each latent size of every run (``best_per_latent``), with its
        trial id, the run's PCA error there and the ratio to it."""
        out = []
        for name, r in self.runs.items():
            table = best_per_latent(r.trials, r.spec, r.baselines)
            if table.empty:
                continue
            table = table.assign(run=name, trial_id=_winner_ids(r.trials))
            out.append(table)
        return pd.concat(out, ignore_index=True) if out else pd.DataFrame()

    def differences(self) -> pd.DataFrame:
        """The spec settings whose values differ between the runs: one row per dotted key,
        one column per run ("-" where a run's spec does not name it)."""
        from cae.run.record import flatten

        flat = {name: flatten(r.spec) for name, r in self.runs.items()}
        keys = sorted(set().union(*flat.values())) if flat else []
        rows = []
        for key in keys:
            values = [_setting(f.get(key)) for f in flat.values()]
            if len(set(values)) > 1:
                rows.append({"setting": key, **dict(zip(flat, values))})
        return pd.DataFrame(rows, columns=["setting", *flat])


def _setting(value) -> str:
    """A spec setting as the differences table shows it ("-": not named, or null)."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def _dataset(run: Run) -> str:
    t = run.trials
    if "data.dataset" in t and t["data.dataset"].notna().any():
        return str(t["data.dataset"].dropna().iloc[0])
    return str(((run.spec.get("trial") or {}).get("data") or {}).get("dataset", "?"))


def _winner_ids(trials: pd.DataFrame) -> list:
    """The trial id of the best trial trained to the end at each latent size, in
    ``best_per_latent``'s order (None where none was)."""
    loss = pd.to_numeric(trials["best_val_loss"], errors="coerce")
    done = trials[trained_to_the_end(trials) & loss.notna()]
    out = []
    for latent, _ in trials.groupby("latent_size"):
        ran = done[done["latent_size"] == latent]
        out.append(None if ran.empty else ran.loc[loss[ran.index].idxmin(), "trial_id"])
    return out


def load_runs(*run_dirs: str | Path) -> Runs:
    """Read run directories (local or URIs; finished, running or interrupted) for a
    comparison: each run's tables, spec, reference errors and importance."""
    from cae.results.importance import importance, read_importance
    from cae.run import directory as rundir

    if len(run_dirs) == 1 and isinstance(run_dirs[0], (list, tuple)):
        run_dirs = tuple(run_dirs[0])
    runs, imp = {}, {}
    for where in run_dirs:
        run = load_run(rundir.local_copy(str(where)))
        name = str(where).rstrip("/").rsplit("/", 1)[-1]
        while name in runs:
            name = f"{name}'"
        runs[name] = run
        found = read_importance(run.path)
        imp[name] = found if found is not None else importance(run.trials, run.epochs,
                                                               run.spec)
    return Runs(runs, imp)


# ---- figures ---------------------------------------------------------------------------


def _pca(run: Run) -> pd.Series:
    """PCA's validation error at each latent size of a run's reference errors."""
    b = run.baselines
    if b is None or b.empty:
        return pd.Series(dtype=float)
    b = b[(b["baseline"] == "pca") & (b["split"] == "val")]
    return b.groupby("latent_size")["loss"].min()


def best_per_latent_figure(runs: Runs) -> go.Figure:
    """The best trial at each latent size of every run, with each run's PCA line (or, for
    runs on different datasets or tasks, every error as a ratio to its run's own PCA)."""
    best, ratio = runs.best(), runs.by_ratio
    title = "Best per latent size" + (" relative to each run's own PCA" if ratio else "")
    if best.empty or "best_val_loss" not in best:
        return _empty(title, "no trial trained to its end yet")
    fig = go.Figure()
    for i, (name, run) in enumerate(runs.runs.items()):
        color = BEST_COLORS[i % len(BEST_COLORS)]
        b = best[(best["run"] == name)].dropna(subset=["best_val_loss"])
        pca = _pca(run)
        y = b["best_val_loss"].astype(float)
        if ratio:
            y = y / b["latent_size"].map(pca)
        fig.add_trace(go.Scatter(
            x=b["latent_size"].to_numpy("float32"), y=_positive(y), mode="lines+markers",
            name=f"{name}: best", line=dict(color=color, width=2.5), marker=dict(size=8),
            text=b["trial"].astype(str),
            hovertemplate=f"{html.escape(name)}<br>latent %{{x}}: %{{y:.4g}} (trial "
                          "%{text})<extra></extra>"))
        if not ratio and len(pca):
            fig.add_trace(go.Scatter(
                x=pca.index.to_numpy("float32"), y=_positive(pca), mode="lines+markers",
                name=f"{name}: PCA", line=dict(color=color, width=1.5, dash="dash"),
                marker=dict(symbol="circle-open", size=7),
                hovertemplate=f"{html.escape(name)} PCA<br>latent %{{x}}: %{{y:.4g}}"
                              "<extra></extra>"))
    if ratio:
        fig.add_hline(y=1, line=dict(color="#888", dash="dash"),
                      annotation_text="each run's own PCA", annotation_position="top left")
    fig.update_xaxes(type="log", title_text="latent size", dtick=0.30103)
    fig.update_yaxes(type="log", title_text="best val / own PCA val" if ratio
                     else "best validation loss", **LOG_TICKS)
    fig.update_layout(title=title, height=480, hovermode="closest")
    return fig


def winners_curves(runs: Runs) -> go.Figure:
    """The validation loss per epoch of each run's best trial at each latent size (as a
    ratio to the run's PCA at that size when the runs differ in dataset or task)."""
    best, ratio = runs.best(), runs.by_ratio
    title = "The winners' validation loss" + (" relative to their run's PCA" if ratio else "")
    if best.empty or best["trial_id"].isna().all():
        return _empty(title, "no trial trained to its end yet")
    fig = go.Figure()
    for i, (name, run) in enumerate(runs.runs.items()):
        color, pca = BEST_COLORS[i % len(BEST_COLORS)], _pca(run)
        first = True
        for _, w in best[(best["run"] == name) & best["trial_id"].notna()].iterrows():
            curve = run.epochs[run.epochs["trial_id"].astype(str) == str(w["trial_id"])]
            y = curve.sort_values("epoch")["val_loss"].astype(float)
            if ratio:
                y = y / pca.get(float(w["latent_size"]), float("nan"))
            fig.add_trace(go.Scatter(
                x=curve.sort_values("epoch")["epoch"].to_numpy("float32"), y=_positive(y),
                mode="lines+markers", line=dict(color=color, width=1.5), marker=dict(size=4),
                name=name, legendgroup=name, showlegend=first,
                hovertemplate=f"{html.escape(name)}, latent {int(w['latent_size'])} (trial "
                              f"{w['trial']})<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>"))
            first = False
    fig.update_xaxes(title_text="epoch", tickformat="d", rangemode="tozero")
    fig.update_yaxes(type="log", title_text="val / own PCA" if ratio else "validation loss",
                     **LOG_TICKS)
    fig.update_layout(title=title, height=460, hovermode="closest")
    return fig


# ---- the page ----------------------------------------------------------------------------


def _runs_table(runs: Runs) -> str:
    rows = []
    for name, run in runs.runs.items():
        t = run.trials
        loss = pd.to_numeric(t.get("best_val_loss"), errors="coerce") if len(t) else None
        rows.append({"run": name, "dataset / task": runs.kinds()[name], "trials": len(t),
                     "trained to the end": int(trained_to_the_end(t).sum()) if len(t) else 0,
                     "best val": float(loss.min()) if loss is not None else None,
                     "directory": str(run.path)})
    return frame_html(pd.DataFrame(rows))


def sections(runs: Runs) -> list[tuple[str, str, str]]:
    """(title, explanation, html) of every part of the page after its header."""
    from cae.report.page import _fig_html

    ratio = ("every error is divided by its own run's PCA error at the same latent size "
             "(the runs differ in dataset or task, so their errors are not on one scale)"
             if runs.by_ratio else "the dashed lines are each run's PCA at each latent size")
    diff = runs.differences()
    out = [("Runs", "", _runs_table(runs)),
           ("What differs between their specs", "Every setting whose value is not the same "
            "in all the runs' specs.", frame_html(diff) if len(diff) else
            "<p>The specs are the same.</p>"),
           ("Best per latent size", f"The best trial trained to the end at each latent size "
            f"of each run; {ratio}.", _fig_html(best_per_latent_figure(runs))),
           ("The winners' curves", "Validation loss per epoch of those best trials, one colour "
            "per run.", _fig_html(winners_curves(runs)))]
    imp = runs.importance
    text = "Each run's swept axes weighed against each other (PED-ANOVA, 90% bootstrap " \
           "interval); an axis a run did not sweep has no bar for it."
    body = notes_html(imp)
    if any(has_numbers(f) for f in imp.values()):
        body += _fig_html(importance_bars(imp, "Importance of each swept axis, per run"))
    out.append(("Which settings mattered", text, body or "<p>No swept axes.</p>"))
    return out


def build_compare(runs: Runs) -> str:
    """The whole page as one HTML string (plotly.js embedded once, no network needed)."""
    from plotly.offline import get_plotlyjs

    from cae.report.page import CSS

    names = ", ".join(runs.runs)
    head = [f"<h1>Compare {len(runs.runs)} runs</h1>",
            f'<p class="sub">{html.escape(names)}</p>']
    if runs.by_ratio:
        head.append('<p class="note">These runs differ in dataset or task '
                    f"({html.escape('; '.join(f'{n}: {k}' for n, k in runs.kinds().items()))})"
                    ": their errors are compared by the ratio to each run's own PCA error at "
                    "the same latent size, not by their values.</p>")
    body = "\n".join(f"<section><h2>{html.escape(title)}</h2>"
                     + (f'<p class="sub">{html.escape(text)}</p>' if text else "")
                     + f"\n{part}</section>" for title, text, part in sections(runs))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape('cae compare: ' + names)}</title><style>{CSS}</style>\n"
            f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head><body>\n'
            + "\n".join(head) + f"\n{body}\n</body></html>\n")


def write_compare(run_dirs: list[str], out: str | Path) -> Path:
    """``cae compare``: the page of ``run_dirs`` written (whole) to ``out``."""
    from cae.config.errors import UserError
    from cae.run.directory import write_file

    if len(run_dirs) < 2:
        raise UserError("cae compare: give two or more run directories")
    out = Path(out)
    write_file(out.parent, out.name, build_compare(load_runs(*run_dirs)).encode("utf-8"))
    return out

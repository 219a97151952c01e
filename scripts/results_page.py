"""A finished run's tables and pictures for a results page (docs/results.md is made this way).

    python scripts/results_page.py RUN_DIR --out docs/results --name study_a_fashion --at 1

Prints a Markdown table with one row per configuration, its repeats pooled (mean, and the
min-max over repeats): parameters, latent size, validation loss after each ``--at`` epoch,
best validation loss, test loss, the PCA reference at that latent size, and for denoise the
test error on each distortion; then the references (PCA, and for denoise the distorted input
itself) on the test split. Writes the report's figures as PNG files beside it
(``NAME-latent.png``, ``NAME-distortions.png`` for denoise, ``NAME-pictures.png``: the best
trial's best, median and worst test sample),
rendered by headless Chromium (``--no-figures`` skips them).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cae.report import distortion_errors, latent_vs_error, load_run, sample_pictures  # noqa: E402
from cae.report.run import axis_labels, swept_axes  # noqa: E402

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--hide-scrollbars"]


def _range(values: pd.Series, digits: int = 4) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "-"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ({v.min():.{digits}f}-{v.max():.{digits}f})"


def config_table(run, at: list[int]) -> pd.DataFrame:
    """One row per configuration (``config_id``), repeats pooled, best first."""
    t, e = run.trials, run.epochs
    axes = swept_axes(run.spec, t)
    labels = pd.Series("base", index=t.index)
    if axes:
        labels = pd.concat([axis_labels(t, a).rename(a) for a in axes], axis=1).apply(
            lambda row: "; ".join(v for v in row if v not in ("base", "-")) or "base", axis=1)
    pca = {}
    if run.baselines is not None and not run.baselines.empty:
        b = run.baselines[(run.baselines["baseline"] == "pca")
                          & (run.baselines["split"] == "test")]
        pca = b.groupby("latent_size")["loss"].min().to_dict()
    distortions = [c for c in t.columns if c.startswith("test_loss_")]
    rows = []
    for cid, group in t.groupby("config_id", sort=False):
        first = group.iloc[0]
        row = {"configuration": labels.loc[group.index[0]], "params": int(first["params"]),
               "latent": int(first["latent_size"]), "repeats": len(group)}
        for epoch in at:
            at_e = e[e["trial_id"].isin(group["trial_id"]) & (e["epoch"] == epoch)]
            row[f"val after epoch {epoch}"] = _range(at_e["val_loss"])
        row["best val"] = _range(group["best_val_loss"])
        row["epochs"] = _range(group["epochs"], 0)
        row["test"] = _range(group["test_loss"]) if "test_loss" in group else "-"
        if float(first["latent_size"]) in pca:
            row["PCA test"] = f"{pca[float(first['latent_size'])]:.4f}"
        for c in distortions:
            row[c.removeprefix("test_loss_")] = f"{pd.to_numeric(group[c]).mean():.4f}"
        row["_sort"] = pd.to_numeric(group["best_val_loss"], errors="coerce").mean()
        rows.append(row)
    out = pd.DataFrame(rows).sort_values("_sort").drop(columns="_sort")
    return out.reset_index(drop=True)


def reference_table(run) -> pd.DataFrame:
    """The references on the test split: PCA at each latent size, for denoise the distorted
    input returned as it is (identity) with its per-distortion errors, for colorize the
    training images' mean chroma."""
    b = run.baselines
    if b is None or b.empty:
        return pd.DataFrame()
    b = b[b["split"] == "test"]
    cols = [c for c in b.columns if c.startswith("loss_") and c != "loss_kind"]
    rows = []
    for _, r in b.iterrows():
        name = {"identity": "identity (the distorted input)",
                "mean_chroma": "the training images' mean chroma"}.get(
            r["baseline"], f"PCA, {r['latent_size']:.0f} components")
        rows.append({"reference": name, "test": f"{r['loss']:.4f}",
                     **{c.removeprefix("loss_"): f"{r[c]:.4f}" for c in cols}})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def render_png(fig, path: Path, width: int = 1000, height: int = 560) -> None:
    """A Plotly figure as a PNG, through headless Chromium (no image export library); a
    figure that sets its own size keeps it."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome")) if p), None)
    if browser is None:
        raise SystemExit("rendering PNGs needs Chromium; pass --no-figures to skip them")
    if fig.layout.width and fig.layout.height:
        width, height = fig.layout.width, fig.layout.height
    else:
        fig.update_layout(width=width, height=height, margin=dict(l=60, r=20, t=60, b=50))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(page, include_plotlyjs=True, full_html=True,
                       config={"displayModeBar": False})
        subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={tmp}/profile",
                        f"--window-size={width},{height + 40}", "--virtual-time-budget=10000",
                        f"--screenshot={path.resolve()}", page.as_uri()],
                       capture_output=True, timeout=180, check=False)
    if not path.is_file():
        raise SystemExit(f"Chromium did not write {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=".", help="folder for the PNG files")
    p.add_argument("--name", help="file name prefix (default: the run's name)")
    p.add_argument("--at", type=int, action="append", default=[],
                   help="also tabulate the validation loss after this epoch (repeatable)")
    p.add_argument("--no-figures", action="store_true", help="only print the table")
    args = p.parse_args(argv)
    run = load_run(args.run_dir)
    name = args.name or run.name
    print(markdown(config_table(run, args.at)))
    if not (ref := reference_table(run)).empty:
        print()
        print(markdown(ref))
    if args.no_figures:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = run.trials
    render_png(latent_vs_error(t, run.spec, baselines=run.baselines), out / f"{name}-latent.png")
    dist = distortion_errors(t, run.epochs, baselines=run.baselines)
    if dist is not None:
        render_png(dist, out / f"{name}-distortions.png")
    render_png(sample_pictures(run.path, t, run.spec, n_trials=1), out / f"{name}-pictures.png")
    for f in sorted(out.glob(f"{name}-*.png")):
        print(f"wrote {f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

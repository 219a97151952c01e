"""How big and how slow is the HTML report of a large sweep? (a benchmark, not a test)

Builds the report (``cae.report.page.build_report``, pictures left out: they need
checkpoints, and are 27 small PNGs whatever the sweep's size) for SYNTHETIC frames of
1,000 trials x 50 epochs (every trial runs every epoch: the largest frames such a sweep
can leave), made by ``cae.report.synthetic``: timing input shaped like a real
run's frames, not results. Records the build time, the page's size (goal: under 15 MB) and
what each part weighs; then, when Chromium is installed, how long the page takes to load
and draw in headless Chromium, as a ratio against a baseline page in the same run (plotly.js
and one small plot), as benchmarks here do.

    python benchmarks/report_scale.py            # 1,000 trials x 50 epochs
    python benchmarks/report_scale.py --quick    # 200 x 20, a smoke run

Writes ``benchmarks/results/report_scale.json`` (``report_scale-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import html
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cae.report.page import build_report, sections  # noqa: E402
from cae.report.synthetic import synthetic_run  # noqa: E402

PROBE = """<script>
window.addEventListener('load', function () {
  var nav = performance.getEntriesByType('navigation')[0];
  var out = document.createElement('pre'); out.id = 'load-probe';
  out.textContent = JSON.stringify({
    load_ms: performance.now(), dom_ms: nav ? nav.domContentLoadedEventEnd : null,
    plots: document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 ?
      document.querySelectorAll('.js-plotly-plot').length : 0});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)


def load_in_browser(page: Path, browser: str, profile: Path) -> dict:
    """Open a page (with a load probe) in headless Chromium: in-page load time, wall time."""
    probed = page.with_name(page.stem + "-probe.html")
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--enable-unsafe-swiftshader", "--window-size=1400,3000",
         f"--user-data-dir={profile}", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    m = re.search(r'<pre id="load-probe">(.*?)</pre>', proc.stdout, re.S)
    result = json.loads(html.unescape(m.group(1))) if m else {"load_ms": None, "plots": 0}
    result["wall_s"] = round(wall, 2)
    return result


def baseline_page(path: Path) -> Path:
    """plotly.js and one small plot: what any report costs the browser at least."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[1, 3, 2]))
    path.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><script>{get_plotlyjs()}</script>"
        f"</head><body>{fig.to_html(full_html=False, include_plotlyjs=False)}</body></html>")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 trials x 20 epochs")
    p.add_argument("--trials", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--repeats", type=int, default=3, help="builds (and page loads) to time")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    n_trials = args.trials or (200 if args.quick else 1000)
    n_epochs = args.epochs or (20 if args.quick else 50)
    out = args.out or HERE / "results" / f"report_scale{'-quick' if args.quick else ''}.json"

    t0 = time.perf_counter()
    # Every trial runs every epoch: the largest frames a sweep of this size can leave.
    run = synthetic_run(n_trials=n_trials, n_epochs=n_epochs, task="denoise", stop_early=False)
    synth_s = time.perf_counter() - t0
    builds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        page = build_report(run, pictures=False)
        builds.append(time.perf_counter() - t0)
    size = len(page.encode())
    from plotly.offline import get_plotlyjs

    parts = {a: len(f.encode()) for a, _, _, f in sections(run, pictures=False)}
    result = {
        "what": "cae.report.page.build_report on SYNTHETIC frames (cae.report.synthetic): "
                "timing input, not results; pictures left out",
        "trials": n_trials, "max_epochs": n_epochs, "epoch_rows": len(run.epochs),
        "synthesize_s": round(synth_s, 3),
        "build_s_median": round(statistics.median(builds), 3),
        "build_s_all": [round(b, 3) for b in builds],
        "size_bytes": size, "size_mb": round(size / 1e6, 2), "goal_mb": 15,
        "under_goal": size < 15e6,
        "plotlyjs_bytes": len(get_plotlyjs().encode()), "section_bytes": parts,
        "python": platform.python_version(), "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
    }
    browser = chromium()
    if browser:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            report = tmp / "report.html"
            report.write_text(page)
            base = baseline_page(tmp / "baseline.html")
            loads = {"baseline": [], "report": []}
            for i in range(args.repeats):
                loads["baseline"].append(load_in_browser(base, browser, tmp / f"b{i}"))
                loads["report"].append(load_in_browser(report, browser, tmp / f"r{i}"))
        med = {k: statistics.median(x["load_ms"] or float("nan") for x in v)
               for k, v in loads.items()}
        wall = {k: statistics.median(x["wall_s"] for x in v) for k, v in loads.items()}
        result["browser"] = {
            "chromium": subprocess.run([browser, "--version"], capture_output=True,
                                       text=True).stdout.strip(),
            "baseline_load_ms": round(med["baseline"]), "report_load_ms": round(med["report"]),
            "load_ratio": round(med["report"] / med["baseline"], 2),
            "baseline_wall_s": wall["baseline"], "report_wall_s": wall["report"],
            "plots_drawn": loads["report"][-1]["plots"],
        }
    else:
        result["browser"] = "chromium not installed: page load not measured"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    rows = [
        ("input (SYNTHETIC)", f"{n_trials:,} trials x {n_epochs} epochs "
                              f"({len(run.epochs):,} epoch rows)"),
        ("build time", f"{result['build_s_median']:.2f} s (median of {args.repeats})"),
        ("report size", f"{result['size_mb']:.2f} MB (goal < 15 MB: "
                        f"{'met' if result['under_goal'] else 'MISSED'})"),
        ("  plotly.js", f"{result['plotlyjs_bytes'] / 1e6:.2f} MB"),
        *((f"  {k}", f"{v / 1e6:.2f} MB") for k, v in parts.items()),
    ]
    if isinstance(result["browser"], dict):
        b = result["browser"]
        rows += [("browser load (in page)", f"{b['report_load_ms']} ms vs baseline "
                                            f"{b['baseline_load_ms']} ms: x{b['load_ratio']}"),
                 ("browser wall (process)", f"{b['report_wall_s']:.1f} s vs baseline "
                                            f"{b['baseline_wall_s']:.1f} s"),
                 ("plots drawn", str(b["plots_drawn"]))]
    else:
        rows.append(("browser", result["browser"]))
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

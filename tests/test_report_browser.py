"""The HTML report in a real browser: headless Chromium, offline, no console errors, every
plot drawn.

A copy of the report gets a small probe script at the top of its head: it records console
errors and uncaught exceptions from the very start, and after the page has loaded writes
what Plotly drew (per plot: its size, trace groups, images, canvases, parcoords axes) into
the DOM, which Chromium dumps. Skipped when Chromium is not installed (``.ci/run`` installs
Debian's ``chromium``).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cae.report.page import write_report

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: "
                                                "apt-get install chromium; .ci/run does it)"),
]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-unsafe-swiftshader",  # software WebGL for the parcoords plot
         "--hide-scrollbars", "--window-size=1400,3000"]

PROBE = """
(function () {
  var errors = [];
  var orig = console.error;
  console.error = function () {
    errors.push(Array.prototype.map.call(arguments, String).join(' '));
    return orig.apply(console, arguments);
  };
  window.addEventListener('error', function (e) { errors.push('Uncaught ' + e.message); });
  window.addEventListener('unhandledrejection', function (e) {
    errors.push('Unhandled rejection ' + e.reason);
  });
  window.addEventListener('load', function () {
    setTimeout(function () {
      var plots = [];
      document.querySelectorAll('.js-plotly-plot').forEach(function (p) {
        var svg = p.querySelector('svg.main-svg');
        var r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
        var canvases = Array.prototype.filter.call(p.querySelectorAll('canvas'), function (c) {
          return c.width > 0 && c.height > 0;
        });
        plots.push({
          types: (p.data || []).map(function (t) { return t.type || 'scatter'; }),
          width: r.width, height: r.height,
          scatter: p.querySelectorAll('g.trace.scatter').length,
          bars: p.querySelectorAll('g.trace.bars').length,
          images: p.querySelectorAll('image').length,
          canvases: canvases.length,
          pcaxes: p.querySelectorAll('g.axis-heading').length
        });
      });
      var out = document.createElement('pre');
      out.id = 'render-probe';
      out.textContent = JSON.stringify({plots: plots, errors: errors});
      document.body.appendChild(out);
    }, 1500);
  });
})();
"""


def render(page: Path, profile: Path) -> tuple[dict, str]:
    """Open ``page`` with the probe in headless Chromium: (probe result, browser log)."""
    probed = page.with_name(page.stem + "-probe.html")
    text = page.read_text()
    probed.write_text(text.replace("<head>", f"<head><script>{PROBE}</script>", 1))
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=20000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="render-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the probe did not report; chromium said:\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(m.group(1))), proc.stderr


def page_errors(log: str) -> list[str]:
    """Uncaught exceptions and failed loads the browser logged for our page."""
    return [ln for ln in log.splitlines()
            if ("Uncaught" in ln or "Failed to load" in ln or "ERR_" in ln)
            and "CONSOLE" in ln]


@pytest.mark.parametrize("task", ["reconstruct", "denoise"])
def test_report_renders_every_plot_without_errors(small_run, tmp_path, task):
    run_dir = small_run(task)
    page = write_report(run_dir, tmp_path / "report.html")
    expected = page.read_text().count('class="plotly-graph-div"')
    assert expected == (6 if task == "denoise" else 5)
    probe, log = render(page, tmp_path / "profile")
    assert probe["errors"] == []
    assert page_errors(log) == []
    plots = probe["plots"]
    assert len(plots) == expected  # every figure became a Plotly plot
    for p in plots:
        assert p["width"] > 300 and p["height"] > 150, p
        n_scatter = p["types"].count("scatter")
        n_bars = p["types"].count("bar")
        n_images = p["types"].count("image")
        assert p["scatter"] == n_scatter and p["bars"] == n_bars and p["images"] == n_images, p
        if "parcoords" in p["types"]:
            assert p["canvases"] >= 1 and p["pcaxes"] >= 4, p  # axes + latent + loss
    kinds = [p["types"][0] for p in plots]
    assert kinds.count("parcoords") == 1 and kinds[-1] == "image"
    assert sum(p["images"] for p in plots) == 27  # 3 trials x 3 samples x 3 pictures
    if task == "denoise":
        assert any(p["bars"] >= 1 for p in plots)


def test_report_screenshot(small_run, tmp_path_factory, tmp_path):
    """A screenshot for a person to look at (path printed; the test checks it was made)."""
    run_dir = small_run("reconstruct")
    page = write_report(run_dir, tmp_path / "report.html")
    shot = tmp_path_factory.getbasetemp() / "report-screenshot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                    "--virtual-time-budget=20000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")

"""analysis/trials.ipynb runs top to bottom (nbclient, kernel ``python3``) against a real
small sweep and shows its figures and tables."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "trials.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"

pytestmark = pytest.mark.slow


def execute(run_dir: Path, monkeypatch) -> "nbformat.NotebookNode":  # noqa: F821
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CAE_RUN_DIR", str(run_dir))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("task", ["reconstruct", "denoise"])
def test_notebook_runs_on_a_real_sweep(small_run, monkeypatch, task):
    run_dir = small_run(task)
    nb = execute(run_dir, monkeypatch)
    outs = outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    figs = [o for o in outs if PLOTLY in o.get("data", {})]
    # loss, latent, axes, parallel, pictures, table, the best model's latents; plus per
    # distortion for denoise
    assert len(figs) == (8 if task == "denoise" else 7)
    titles = [o["data"][PLOTLY]["layout"]["title"]["text"] for o in figs]
    assert titles[0].startswith("Loss evolution") and titles[1].startswith("Latent size")
    assert titles[-1].startswith("Test latents of the best model")
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    assert f"{run_dir}: 8 trials" in text
    frames = [o for o in outs if "text/html" in o.get("data", {})]
    assert len(frames) >= 4  # trials, status counts, epochs, pareto, pivot
    assert "best_val_loss" in frames[0]["data"]["text/html"]

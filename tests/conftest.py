"""Shared test settings and the small real sweep several test files look at."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Local Ray binds to 127.0.0.1 only (as `cae sweep` sets before importing ray); set here too
# because tests import ray before any sweep starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A function task -> run dir: the quickstart sweep at 3 epochs over latent 4 and 16
    (8 trials), run once per session and task."""

    def make(task: str = "reconstruct") -> Path:
        from cae.cli import main

        run_dir = tmp_path_factory.getbasetemp() / "analysis-runs" / f"t-{task}"
        if not (run_dir / "trials.parquet").is_file():
            args = ["sweep", str(REPO / "sweeps" / "quickstart.yaml"), "--storage",
                    str(run_dir.parent), "--name", run_dir.name, "--no-report",
                    "--set", "trial.max_epochs=3", "--set", "trial.data.train_limit=1500",
                    "--set", "space.model.latent_dim={grid: [4, 16]}",
                    "--set", f"trial.task.name={task}"]
            assert main(args) == 0
        return run_dir

    return make

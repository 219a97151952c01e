"""Shared test settings and the small real sweep several test files look at."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from cae.sweep.internals import LOOPBACK_ENV

REPO = Path(__file__).resolve().parents[1]

# Local Ray binds to 127.0.0.1 only (as `cae sweep` sets before importing ray); set here too
# because tests import ray before any sweep starts.
os.environ.setdefault(LOOPBACK_ENV, "0")


@pytest.fixture
def float64():
    """Tensors made in the test default to float64 (bit-level comparisons of fused and
    separate runs)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


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


def shared_data() -> Path:
    """The offline MNIST and Fashion-MNIST archives (``../shared/data`` beside the checkout,
    or ``$CAE_SHARED_DATA``); never written to."""
    env = os.environ.get("CAE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_copy(tmp_path_factory) -> Path:
    """A writable copy of the offline archives (torchvision extracts next to them)."""
    src = shared_data()
    if not (src / "MNIST" / "raw").is_dir() or not (src / "FashionMNIST" / "raw").is_dir():
        pytest.skip(f"offline dataset archives not found at {src} (set CAE_SHARED_DATA)")
    dst = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        shutil.copytree(src / name, dst / name)
    return dst

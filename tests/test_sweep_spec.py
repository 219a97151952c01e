"""Sweep specs: every shipped spec passes the dry run; bad specs are refused cleanly."""

from pathlib import Path

import pytest
import yaml

from cae.cli import main
from cae.config import load_spec
from cae.sweep import check_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
SPECS = sorted(p for p in SWEEPS.glob("*.yaml") if p.name != "single.yaml")


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_passes_the_dry_run(path, capsys, tmp_path):
    assert main(["sweep", str(path), "--dry-run", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "trials" in out and "distinct architectures" in out and "trial-epochs" in out
    assert not (tmp_path / "runs").exists()


def test_quickstart_and_full_grid_sizes():
    quick = check_spec(load_spec(str(SWEEPS / "quickstart.yaml")))
    full = check_spec(load_spec(str(SWEEPS / "full_grid.yaml")))
    assert quick.n_trials >= 16
    assert full.n_trials >= 1000
    assert len(quick.models) == quick.n_trials  # every quickstart trial is its own model


def test_dry_run_lists_params_and_latent_of_each_architecture(capsys):
    main(["sweep", str(SWEEPS / "study_a_cifar10.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert "5 trials" in out
    for params, latent in [(4911, 1024), (42338, 4096)]:
        assert f"{params:,}" in out and str(latent) in out
    for latent in ("3072", "8192", "576"):
        assert latent in out


def _write(tmp_path, spec: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


BASE = {"name": "bad", "trial": {"data": {"dataset": "sample"}, "max_epochs": 2}}


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"schedulr": {"kind": "asha"}}, ["schedulr", "Extra inputs"]),
        ({"num_samples": "many"}, ["num_samples"]),
        ({"space": {"model.latent_dim": {"grid": []}}}, ["space.model.latent_dim", "non-empty"]),
        ({"space": {"model.channels": {"grid": [[8, 16], [8, 8, 8, 8, 8, 8]]}}},
         ["model.pool", "pools a 1x1 map", "grid point", "[8, 8, 8, 8, 8, 8]"]),
        ({"space": {"model.kernl": {"grid": [3, 5]}}}, ["model.kernl", "grid point"]),
        ({"trial": {"data": {"dataset": "sample"}, "batch_size": "big"}},
         ["batch_size", "base trial"]),
        ({"resources": {"gpu": 2}}, ["resources.gpu", "this machine has 0"]),
        ({"space": {"lr": {"loguniform": [0, 0.1]}}}, ["space.lr", "low > 0"]),
    ],
)
def test_bad_specs_exit_2_naming_the_field(tmp_path, capsys, change, needles):
    import ray
    import torch

    if "resources" in change and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs the spec asks for")

    ray.shutdown()
    storage = tmp_path / "runs"
    spec = {**BASE, **change}
    rc = main(["sweep", _write(tmp_path, spec), "--storage", str(storage)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("cae: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err
    assert not storage.exists()
    assert not ray.is_initialized()


def test_missing_spec_file(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err

"""Sweep specs: every shipped spec passes the dry run; bad specs are refused cleanly."""

from pathlib import Path

import pytest
import yaml

from cae.cli import main
from cae.config.spec import load_spec
from cae.sweep.plan import check_spec

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
    assert quick.n_trials == 16
    assert full.n_trials == 3780
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


@pytest.mark.parametrize("change, needles", [
    ({"space": {"model.convs": 1_000_000_000}}, ["convs", "between 1 and 64"]),
    ({"space": {"model.channels": [8, 100_000]}}, ["channels", "between 1 and 4096"]),
    ({"space": {"model.dense": [64] * 100}}, ["model.dense", "at most 32"]),
    ({"space": {"model.latent_dim": 10**12}}, ["model.latent_dim", "less than or equal"]),
    ({"trial": {"max_epochs": 10**9}}, ["max_epochs", "less than or equal"]),
    ({"space": {"lr": {"grid": list(range(1, 1001))}, "seed": {"grid": list(range(1001))},
                "batch_size": {"grid": [8, 16]}}}, ["space:", "2,002,000", "split the sweep"]),
])
def test_huge_sizes_are_refused_at_once_naming_the_field(tmp_path, capsys, change, needles):
    assert main(["sweep", _write(tmp_path, {**BASE, **change}), "--dry-run"]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("change, field", [
    ({"resources": {"cpu": 1, "gpu": float("inf")}}, "resources.gpu"),  # found by test_fuzz
    ({"resources": {"cpu": float("nan")}}, "resources.cpu"),
    ({"trial": {"lr": float("inf")}}, "lr"),
    ({"space": {"model.dropout": {"grid": [0.1, float("nan")]}}}, "model.dropout"),
    ({"space": {"lr": {"uniform": [0.001, float("inf")]}}}, "lr"),
])
def test_infinite_and_nan_numbers_are_refused_naming_the_field(tmp_path, capsys, change, field):
    assert main(["sweep", _write(tmp_path, {**BASE, **change}), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cae: error: ") and "Traceback" not in err, err
    assert f"{field}: Input should be a finite number" in err, err


def test_a_point_that_cannot_fit_its_memory_share_is_refused(tmp_path, capsys):
    """The dry run estimates each architecture's memory per trial and refuses, before
    anything starts, a grid point that cannot fit a CPU trial's share of this machine."""
    from cae.model.memory import machine_memory

    spec = {**BASE, "space": {"batch_size": {"grid": [64, 2**20]}}}
    assert main(["sweep", _write(tmp_path, spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "batch_size: 1048576" in err and "MiB" in err and "share" in err, err
    assert "1 of" in err and f"{machine_memory() / 2**30:.0f} GiB RAM" in err
    spec["space"]["batch_size"]["grid"] = [64, 128]
    assert main(["sweep", _write(tmp_path, spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory per trial: at most" in out and " MiB " in out


def test_the_memory_estimate_counts_what_it_says():
    from cae.config.trial import TrialConfig
    from cae.model.memory import RUNTIME_BYTES, estimate, layer_outputs

    cfg = TrialConfig.model_validate({"data": {"dataset": "sample", "train_limit": 1000},
                                      "model": {"channels": [4], "bottleneck": "conv",
                                                "latent_channels": 2}, "batch_size": 10,
                                      "eval_batch_size": 10})
    # conv 4x28x28, relu, pool 4x14x14, latent conv 2x14x14, relu; up 28x28 (2 ch),
    # conv 4x28x28, relu, output conv 1x28x28, sigmoid
    outs = (2 * 4 * 28 * 28 + 4 * 14 * 14 + 2 * 2 * 14 * 14 + 2 * 28 * 28
            + 2 * 4 * 28 * 28 + 2 * 28 * 28)
    assert layer_outputs(cfg.model) == outs
    e = estimate(cfg)
    from cae.model.plan import param_count

    assert e.weights == 20 * param_count(cfg.model)
    assert e.activations == 10 * (8 * outs + 4 * 2 * 784)
    assert e.data == 784 * (2 * 1000 + 1000) + 4 * 2 * 784 * (100 + 1000)
    assert e.total == e.weights + e.activations + e.data + RUNTIME_BYTES

"""The `cae` command: models, train, and bad input as one message with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cae.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_models_json_has_the_exact_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["study_a_colorize"]["params"] == 42_338
    assert rows["study_b_model12"]["params"] == 107_877
    assert rows["study_b_model12"]["latent_size"] == 8
    assert [rows[n]["latent_size"] for n in ("study_a_default", "study_a_fewer_layers",
                                             "study_a_more_channels",
                                             "study_a_larger_filters")] == [1024, 3072, 8192, 576]


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "study_b_model12" in out and "107,877" in out and "1x28x28" in out


def test_train_single_yaml_runs_and_val_loss_falls(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cae.cli", "train", str(REPO / "sweeps" / "single.yaml"),
         "--set", "max_epochs=2", "--set", "data.train_limit=800", "--out", str(tmp_path)],
        capture_output=True, text=True, check=True).stdout
    vals = [float(line.split("val ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("epoch")]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert "done: best val" in out and "test_loss" in out
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "history.json").is_file()


def _config(tmp_path, data: dict) -> str:
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "config, needles",
    [
        ({"modle": {}}, ["modle", "Extra inputs"]),
        ({"model": {"bottleneck": "dense", "latent_dim": 0}},
         ["model.latent_dim", "greater than or equal to 1"]),
        ({"model": {"channels": [8], "kernel": 31, "padding": 0}},
         ["model.kernel", "larger than its input"]),
        ({"model": {"channels": [8, 8, 8, 8, 8]}}, ["model.pool", "pools a 1x1 map"]),
        ({"data": {"dataset": "mnist"}, "task": {"name": "colorize"}}, ["colorize", "RGB"]),
        ({"data": {"dataset": "mnist", "download": False}},
         ["mnist", "MNIST/raw/train-images-idx3-ubyte.gz"]),
        ({"lr": "fast"}, ["lr"]),
    ],
)
def test_bad_input_is_one_message_and_exit_2(tmp_path, capsys, monkeypatch, config, needles):
    monkeypatch.setenv("CAE_DATA_DIR", str(tmp_path / "empty"))
    rc = main(["train", _config(tmp_path, config)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("cae: error:") and err.count("cae: error") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_set_override_and_missing_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", str(REPO / "sweeps" / "single.yaml"), "--set", "nokey"]) == 2
    assert "key=value" in capsys.readouterr().err


@pytest.mark.parametrize("run_dir, needle", [
    ("foo://bucket/run", "Unrecognized filesystem"),    # no such filesystem
    ("s3://cae-sweep-no-such-bucket-7f3a/run", "cae-sweep-no-such-bucket-7f3a"),  # unreachable
    ("file:///nonexistent/run", "not a cae run directory"),
])
def test_unreadable_run_directory_is_one_message(run_dir, needle, capsys):
    """export/report of a run directory that cannot be read: one line, exit 2, no traceback."""
    for command in (["export", run_dir], ["report", run_dir, "--no-pictures"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("cae: error:") and needle in err and "Traceback" not in err, err


def test_a_bug_is_not_reported_as_bad_input(monkeypatch, capsys):
    """An unexpected exception is an internal error (exit 1) naming the exception, not a
    user error; --debug shows its traceback."""
    import cae.model.network

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(cae.model.network, "describe", broken)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "boom" in err and "--debug" in err
    assert not err.startswith("cae: error:")
    monkeypatch.delenv("CAE_DEBUG", raising=False)
    with pytest.raises(KeyError, match="boom"):
        main(["--debug", "models"])


def test_an_os_error_deep_inside_is_a_bug_but_a_bad_path_is_input(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.delenv("CAE_DEBUG", raising=False)
    assert main(["report", str(tmp_path)]) == 2  # exists, but is no run directory
    assert "not a cae run directory" in capsys.readouterr().err
    spec = tmp_path / "s.yaml"
    spec.write_bytes(b"\xff\xfe\x00 not yaml")
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    assert "cae: error:" in capsys.readouterr().err


def test_a_local_ray_is_started_in_token_mode_without_its_notice(monkeypatch):
    """Ray prints "Token authentication is enabled for this Ray cluster..." whenever it
    starts with the mode unset; cae sets the mode Ray would choose, before ray is first
    imported, and leaves a mode the user set alone (a real sweep's output:
    tests/test_sweep.py)."""
    import os

    from cae.sweep import tuner

    monkeypatch.delenv(tuner.AUTH_MODE_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a fresh `cae sweep`
    tuner.token_auth_without_notice()
    assert os.environ[tuner.AUTH_MODE_ENV] == "token"
    monkeypatch.setenv(tuner.AUTH_MODE_ENV, "disabled")
    tuner.token_auth_without_notice()
    assert os.environ[tuner.AUTH_MODE_ENV] == "disabled"
    monkeypatch.delenv(tuner.AUTH_MODE_ENV)
    monkeypatch.setitem(sys.modules, "ray", object())  # imported already: Ray's own way
    tuner.token_auth_without_notice()
    assert tuner.AUTH_MODE_ENV not in os.environ


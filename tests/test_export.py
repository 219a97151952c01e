"""Trained models out of a run: load_model, cae export-models, cae encode.

One small real sweep (Ray, on a folder of real images written here) is run once for the
slow tests; the exported torch.export programs are then run in a Python that cannot import
cae at all, and must give the model's own outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cae.cli import main
from cae.config.errors import UserError
from cae.config.trial import DataConfig, TrialConfig
from cae.data import datasets as cdata
from cae.export import select


def _trials(**columns) -> pd.DataFrame:
    base = {"trial_id": ["e_00000", "e_00001", "e_00002", "e_00003"],
            "trial_dir": ["t0", "t1", "t2", "t3"],
            "latent_size": [4, 4, 8, 8],
            "best_val_loss": [0.05, 0.02, 0.03, 0.01],
            "stop_reason": ["max_epochs", "sha", "patience", "max_epochs"],
            "status": ["TERMINATED"] * 4,
            "model.channels": ["[4, 8]", "[4, 8]", "[8, 16]", "[8, 16]"]}
    base.update(columns)
    return pd.DataFrame(base)


def test_select_picks_the_best_trained_to_the_end():
    t = _trials()
    assert select(t)["trial_id"] == "e_00003"
    # e_00001 has the lower loss at latent 4, but the scheduler stopped it early
    assert select(t, {"latent_size": 4})["trial_id"] == "e_00000"
    assert select(t, {"model.channels": [8, 16]})["trial_id"] == "e_00003"
    assert select(t, "00002")["trial_id"] == "e_00002"  # an id's number, or the id, or dir
    assert select(t, "t1")["trial_id"] == "e_00001"
    running = _trials(status=["TERMINATED", "TERMINATED", "TERMINATED", "RUNNING"],
                      stop_reason=["max_epochs", "sha", "patience", "running"])
    assert select(running)["trial_id"] == "e_00002"
    with pytest.raises(UserError, match="no trial trained to its end with latent_size=16"):
        select(t, {"latent_size": 16})
    with pytest.raises(UserError, match="no such column"):
        select(t, {"latent": 4})
    with pytest.raises(UserError, match="trial '99'"):
        select(t, "99")


# ---- a real run ------------------------------------------------------------------------------


@pytest.mark.parametrize("task, shape_in, shape_out", [
    ("reconstruct", "(B, 1, 28, 28)", "(B, 1, 28, 28)"),
    ("colorize", "(B, 1, 32, 32)", "(B, 2, 32, 32)"),
])
def test_the_model_card_writes_shapes_as_torch_does(task, shape_in, shape_out):
    from cae.export import card
    from cae.model.network import build_model

    data = {"dataset": "cifar10", "download": False} if task == "colorize" else {}
    cfg = TrialConfig.model_validate({"task": {"name": task}, "data": data,
                                      "model": {"channels": [4], "latent_dim": 4}})
    row = pd.Series({"trial_id": "e_00001", "best_epoch": 3, "best_val_loss": 0.01,
                     "test_loss": 0.02})
    text = card(build_model(cfg.model), cfg, row, "runs/r", None)
    assert f"`encoder.pt2`: images {shape_in} float32" in text
    assert f"-> images {shape_out}. Any batch" in text
    assert f"x: {shape_in} in [0, 1]" in text


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A sweep over latent sizes 4 and 8 on a folder of 240 real 28x28 images: (run dir,
    the folder)."""
    tmp = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAE_DATA_DIR", str(tmp / "data-cache"))
        cdata.clear_cache()
        images = tmp / "images"
        for i, img in enumerate(cdata.load(DataConfig(dataset="sample")).train[:240, 0].numpy()):
            (images / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(images / f"c{i % 3}" / f"{i:03d}.png")
        spec = tmp / "spec.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "export",
            "trial": {"data": {"dataset": "folder", "path": str(images)},
                      "model": {"channels": [4, 8], "dense": [16], "latent_dim": 4},
                      # patience 1: a trial that stops by patience ended on an epoch worse
                      # than its best, so its best weights are not its last
                      "batch_size": 32, "max_epochs": 30, "patience": 1, "lr": 0.03},
            "space": {"model.latent_dim": {"grid": [4, 8]}},
            "scheduler": {"kind": "fifo"}}))
        assert main(["sweep", str(spec), "--storage", str(tmp / "runs"), "--name", "r"]) == 0
        yield tmp / "runs" / "r", images
        cdata.clear_cache()


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models")
    assert main(["export-models", str(run[0]), "-o", str(out), "--best-per", "latent_size"]) == 0
    return out


def _val_loss(model, cfg: TrialConfig, weights: dict | None = None) -> float:
    """The model's validation loss, computed as a trial computes it."""
    from cae.data.datasets import load, split
    from cae.train.loop import per_sample_loss
    from cae.train.tasks import make_task

    if weights is not None:
        model.load_state_dict(weights)
    splits = split(load(cfg.data), cfg.data.val_fraction, cfg.data.split_seed)
    x, y, _ = make_task(cfg.task).eval_inputs(splits.val, seed=cfg.task.eval_seed)
    with torch.inference_mode():
        return float(per_sample_loss(cfg.loss, model(x), y).double().mean())


@pytest.mark.slow
def test_load_model_gives_the_best_epochs_weights(run):
    from cae import load_model
    from cae.export import best_weights, read_trials

    trials = pd.read_parquet(run[0] / "trials.parquet")
    assert (trials["best_epoch"] < trials["epochs"]).any()  # else this test shows nothing
    for _, row in trials.iterrows():
        model, cfg = load_model(str(run[0]), trial=row["trial_id"])
        assert not model.training and cfg.model.latent_dim == model.plan.latent_size
        assert _val_loss(model, cfg) == pytest.approx(row["best_val_loss"], rel=1e-5)
        if row["best_epoch"] < row["epochs"]:  # the last epoch's weights are another model
            _, local = read_trials(str(run[0]))
            newest = max((local / row["trial_dir"]).glob("checkpoint_*/state.pt"))
            last = torch.load(newest, weights_only=True)["model"]
            assert _val_loss(model, cfg, last) == pytest.approx(row["last_val_loss"], rel=1e-5)
            assert row["last_val_loss"] != pytest.approx(row["best_val_loss"], rel=1e-5)
        z = model.encode(torch.rand(3, 1, 28, 28))
        assert z.shape == (3, cfg.model.latent_dim)
        assert model.decode(z).shape == (3, 1, 28, 28)
    best, cfg = load_model(str(run[0]))
    assert _val_loss(best, cfg) == pytest.approx(trials["best_val_loss"].min(), rel=1e-5)
    eight, _ = load_model(str(run[0]), {"latent_size": 8})
    assert eight.plan.latent_size == 8
    assert torch.equal(eight.state_dict()["decoder.0.weight"],
                       best_weights(str(run[0]), select(trials, {"latent_size": 8}))[
                           "decoder.0.weight"])


@pytest.mark.slow
def test_load_model_from_a_uri(run, monkeypatch, tmp_path):
    """A run at a URI (file:// here, read through pyarrow's filesystems as s3:// and gs://
    are) gives the same model as the local directory."""
    from cae import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    remote, _ = load_model(f"file://{run[0]}", {"latent_size": 4})
    local, _ = load_model(str(run[0]), {"latent_size": 4})
    for key, value in local.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key


BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cae", "analysis"):
            raise ImportError(f"{name} is blocked here")
sys.meta_path.insert(0, Block())
try:
    import cae
except ImportError:
    pass
else:
    raise SystemExit("cae could be imported")
import torch
encoder = torch.export.load(sys.argv[1]).module()
decoder = torch.export.load(sys.argv[2]).module()
x = torch.load(sys.argv[3])
z = encoder(x)
torch.save({"z": z, "x_hat": decoder(z), "z1": encoder(x[:1]), "x_hat1": decoder(z[:1])},
           sys.argv[4])
"""


@pytest.mark.slow
def test_exported_programs_run_without_cae(run, exported, tmp_path):
    from cae.export import load_exported

    dirs = sorted(p for p in exported.iterdir() if p.is_dir())
    assert len(dirs) == 2  # one per latent size
    trials = pd.read_parquet(run[0] / "trials.parquet")
    for d in dirs:
        assert {p.name for p in d.iterdir()} == {"encoder.pt2", "decoder.pt2", "weights.pt",
                                                "config.json", "card.md"}
        model, cfg = load_exported(d)
        row = trials[trials["trial_id"] == d.name].iloc[0]
        card = (d / "card.md").read_text()
        latent = model.plan.latent_size
        assert f"| latent size | {latent} |" in card
        assert f"| validation mse (best epoch {row['best_epoch']}) | " \
               f"{row['best_val_loss']:.5g} |" in card
        assert f"| test mse | {row['test_loss']:.5g} |" in card
        base = pd.read_parquet(run[0] / "baselines.parquet")
        pca = base[(base["baseline"] == "pca") & (base["split"] == "val")
                   & (base["latent_size"] == latent)]["loss"].iloc[0]
        assert f"| PCA at latent {latent}, val | {pca:.5g} |" in card
        assert "images (B, 1, 28, 28) float32" in card and "images (B, 1, 28, 28). Any" in card
        assert TrialConfig.model_validate(json.loads((d / "config.json").read_text())) == cfg

        x = torch.rand(5, 1, 28, 28)
        torch.save(x, tmp_path / "x.pt")
        subprocess.run([sys.executable, "-I", "-c", BLOCKED, str(d / "encoder.pt2"),
                        str(d / "decoder.pt2"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       cwd=tmp_path, check=True, timeout=300)
        got = torch.load(tmp_path / "y.pt")
        with torch.inference_mode():
            z = model.encode(x).flatten(1)
            x_hat = model.decode(z)
        assert got["z"].shape == (5, latent) and got["x_hat"].shape == (5, 1, 28, 28)
        torch.testing.assert_close(got["z"], z)
        torch.testing.assert_close(got["x_hat"], x_hat)
        torch.testing.assert_close(got["z1"], z[:1])  # any batch size, one included
        torch.testing.assert_close(got["x_hat1"], x_hat[:1])


@pytest.mark.slow
def test_encode_a_folder_and_an_array_file_as_in_training(run, exported, tmp_path, capsys):
    from cae.export import load_exported, load_model

    run_dir, images = run
    model_dir = min(p for p in exported.iterdir() if p.is_dir())
    model, _ = load_exported(model_dir)
    out = tmp_path / "latents.npz"
    assert main(["encode", str(model_dir), "--images", str(images), "-o", str(out)]) == 0
    assert "latents of 240 images" in capsys.readouterr().out
    got = np.load(out)
    paths = list(got["paths"])
    assert paths == sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    pixels = np.stack([np.asarray(Image.open(images / p)) for p in paths])[:, None]
    with torch.inference_mode():
        expect = model.encode(torch.from_numpy(pixels).float() / 255).flatten(1).numpy()
    assert got["latents"].shape == (240, model.plan.latent_size)
    np.testing.assert_allclose(got["latents"], expect, rtol=1e-5, atol=1e-6)

    array = pixels[:50, 0]  # N x H x W uint8
    np.save(tmp_path / "a.npy", array)
    out = tmp_path / "from_run.npz"
    assert main(["encode", str(run_dir), "--trial", "latent_size=8", "--images",
                 str(tmp_path / "a.npy"), "-o", str(out)]) == 0
    eight, _ = load_model(str(run_dir), {"latent_size": 8})
    with torch.inference_mode():
        expect = eight.encode(torch.from_numpy(array[:, None]).float() / 255).numpy()
    got = np.load(out)
    assert "paths" not in got and got["latents"].shape == (50, 8)
    np.testing.assert_allclose(got["latents"], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_export_errors_are_one_line(run, tmp_path, capsys):
    assert main(["export-models", str(run[0]), "-o", str(tmp_path), "--trial", "nope"]) == 2
    assert main(["encode", str(tmp_path), "--images", str(run[1]), "-o",
                 str(tmp_path / "z.npz")]) == 2
    assert main(["encode", str(run[0]), "--images", str(tmp_path / "missing"), "-o",
                 str(tmp_path / "z.npz")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 3 and all(e.startswith("cae: error: ") for e in errs)

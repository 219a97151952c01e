"""The report's reference errors: PCA at each latent size and the identity, checked against
direct, independent computations (numpy SVD, projection, clamp, the loss written out)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cae.config.catalog import DISTORTIONS
from cae.config.trial import DataConfig, TaskConfig, TrialConfig
from cae.data.datasets import ImageData, load, split
from cae.results.baselines import (
    BASELINES_FILE,
    COLUMNS,
    compute_baselines,
    read_baselines,
    write_baselines,
)
from cae.train.tasks import make_task

DATA = DataConfig(dataset="sample", train_limit=400, test_limit=200)
D = 28 * 28


def trial(task: str = "reconstruct", loss: str = "mse", data: DataConfig = DATA) -> TrialConfig:
    return TrialConfig(data=data, task=TaskConfig(name=task), loss=loss)


@pytest.fixture(scope="module")
def sample() -> ImageData:
    return load(DATA)


def direct_pca(train: torch.Tensor):
    """Mean and right singular vectors (rows, by decreasing singular value) of the centred
    training matrix, and its rank, in float64 numpy."""
    x = train.reshape(train.shape[0], -1).numpy().astype(np.float64) / 255.0
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    rank = int((s > s[0] * max(x.shape) * np.finfo(np.float64).eps).sum())
    return mean, vt, rank


def direct_loss(kind: str, out: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-sample loss, averaged over pixels, written out independently of cae.train.trainer."""
    out, target = out.reshape(len(out), -1), target.reshape(len(target), -1)
    if kind == "mse":
        per_pixel = (out - target) ** 2
    elif kind == "l1":
        per_pixel = np.abs(out - target)
    else:
        p = np.clip(out, 1e-6, 1 - 1e-6)
        per_pixel = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    return per_pixel.mean(1)


def pca_predict(mean, vt, k: int, x: np.ndarray) -> np.ndarray:
    xf = x.reshape(len(x), -1).astype(np.float64)
    v = vt[:k].T  # (D, k)
    return np.clip(mean + (xf - mean) @ v @ v.T, 0.0, 1.0)


def row(frame: pd.DataFrame, baseline: str, split_name: str, k: int | None = None) -> pd.Series:
    sel = (frame["baseline"] == baseline) & (frame["split"] == split_name)
    sel &= frame["latent_size"].isna() if k is None else frame["latent_size"] == k
    assert sel.sum() == 1, (baseline, split_name, k)
    return frame[sel].iloc[0]


@pytest.mark.parametrize("loss", ["mse", "l1", "bce"])
def test_pca_matches_a_direct_computation(sample, loss):
    cfg = trial(loss=loss)
    sizes = [3, 16, 64]
    frame = compute_baselines(cfg, sample, sizes)
    splits = split(sample, cfg.data.val_fraction, cfg.data.split_seed)
    mean, vt, _ = direct_pca(splits.train)
    for split_name, images in (("val", splits.val), ("test", splits.test)):
        x = images.numpy().astype(np.float64) / 255.0
        for k in sizes:
            want = direct_loss(loss, pca_predict(mean, vt, k, x), x).mean()
            got = row(frame, "pca", split_name, k)
            assert got["loss"] == pytest.approx(want, rel=1e-4), (split_name, k)
            assert got["components"] == k
    assert set(frame["loss_kind"]) == {loss}
    assert set(frame["dataset"]) == {"sample"} and set(frame["task"]) == {"reconstruct"}
    assert list(frame.columns) == list(COLUMNS)  # no identity and no groups for reconstruct
    assert len(frame) == len(sizes) * 2


def test_pca_error_falls_with_latent_size_and_vanishes_at_the_input_size(sample):
    cfg = trial()
    splits = split(sample, cfg.data.val_fraction, cfg.data.split_seed)
    _, _, rank = direct_pca(splits.train)
    assert 256 < rank < 500 < D  # 360 training images of 784 pixels
    sizes = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, rank, 500, D, 5000]
    frame = compute_baselines(cfg, sample, sizes)
    for split_name in ("val", "test"):
        part = frame[frame["split"] == split_name].sort_values("latent_size")
        assert part["latent_size"].tolist() == sizes
        # beyond the training rank there is nothing more to use, up to the input size
        assert part["components"].tolist() == [*sizes[:-3], rank, D, D]
        losses = part["loss"].to_numpy()
        assert np.all(np.diff(losses) <= 1e-7), losses
        assert losses[0] > 10 * losses[9]  # the mean alone is far worse than 256 components
        assert losses[-4] == losses[-3]  # k = 500 uses the rank's components
        assert losses[-1] == pytest.approx(0.0, abs=1e-12)  # k > D: clipped to D
        assert losses[-2] == pytest.approx(0.0, abs=1e-12)  # k = D: exact


def test_duplicate_and_unsorted_sizes_are_one_row_each_and_bad_ones_refused(sample):
    frame = compute_baselines(trial(), sample, [16, 4, 16, np.int64(4)])
    assert frame["latent_size"].tolist() == [4, 16, 4, 16]
    assert frame["split"].tolist() == ["val", "val", "test", "test"]
    for bad in ([-1], [2.5]):
        with pytest.raises(ValueError, match="latent sizes"):
            compute_baselines(trial(), sample, bad)


def test_multichannel_images_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    low = torch.randint(0, 256, (300, 3, 2, 2), generator=gen).float()
    noise = torch.randint(-20, 21, (300, 3, 8, 8), generator=gen).float()
    images = (torch.nn.functional.interpolate(low, size=8) + noise).clamp(0, 255).to(torch.uint8)
    data = ImageData(name="synthetic", train=images[:250], test=images[250:])
    cfg = trial(data=DataConfig(dataset="cifar10"))
    frame = compute_baselines(cfg, data, [5, 12, 192])
    splits = split(data, cfg.data.val_fraction, cfg.data.split_seed)
    mean, vt, _ = direct_pca(splits.train)
    x = splits.test.numpy().astype(np.float64) / 255.0
    for k in (5, 12):
        want = direct_loss("mse", pca_predict(mean, vt, k, x), x).mean()
        assert row(frame, "pca", "test", k)["loss"] == pytest.approx(want, rel=1e-4)
    assert row(frame, "pca", "test", 192)["loss"] == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def denoise_frame(sample):
    cfg = trial("denoise")
    return cfg, compute_baselines(cfg, sample, [8, 32])


def _eval_inputs(cfg: TrialConfig, sample: ImageData, split_name: str):
    """The Trainer's inputs: val with eval_seed, test with eval_seed + 1."""
    splits = split(sample, cfg.data.val_fraction, cfg.data.split_seed)
    task = make_task(cfg.task)
    images, seed = ((splits.val, cfg.task.eval_seed) if split_name == "val"
                    else (splits.test, cfg.task.eval_seed + 1))
    x, y, g = task.eval_inputs(images, seed=seed)
    return x.numpy().astype(np.float64), y.numpy().astype(np.float64), g.numpy()


@pytest.mark.parametrize("split_name", ["val", "test"])
def test_identity_is_the_error_of_the_distorted_input(sample, denoise_frame, split_name):
    cfg, frame = denoise_frame
    x, y, groups = _eval_inputs(cfg, sample, split_name)
    per_sample = direct_loss("mse", x, y)
    got = row(frame, "identity", split_name)
    assert got["loss"] == pytest.approx(per_sample.mean(), rel=1e-5)
    assert math.isnan(got["components"])
    for i, name in enumerate(DISTORTIONS):
        assert got[f"loss_{name}"] == pytest.approx(per_sample[groups == i].mean(), rel=1e-5)
    # the full basis reproduces the distorted input: PCA at k = D is the identity
    assert compute_baselines(cfg, sample, [D]).set_index(["baseline", "split"]).loc[
        ("pca", split_name), "loss"] == pytest.approx(got["loss"], rel=1e-6)


@pytest.mark.parametrize("split_name", ["val", "test"])
def test_denoise_pca_projects_the_distorted_input_and_groups_add_up(sample, denoise_frame,
                                                                   split_name):
    cfg, frame = denoise_frame
    x, y, groups = _eval_inputs(cfg, sample, split_name)
    splits = split(sample, cfg.data.val_fraction, cfg.data.split_seed)
    mean, vt, _ = direct_pca(splits.train)  # fitted on the clean training images
    per_sample = direct_loss("mse", pca_predict(mean, vt, 8, x), y)
    got = row(frame, "pca", split_name, 8)
    assert got["loss"] == pytest.approx(per_sample.mean(), rel=1e-4)
    counts = np.bincount(groups, minlength=len(DISTORTIONS))
    for _, r in frame[frame["split"] == split_name].iterrows():
        weighted = sum(r[f"loss_{n}"] * c for n, c in zip(DISTORTIONS, counts)) / counts.sum()
        assert weighted == pytest.approx(r["loss"], rel=1e-9)


def test_denoise_frame_has_one_row_per_baseline_size_and_split(denoise_frame):
    _, frame = denoise_frame
    assert list(frame.columns) == [*COLUMNS, *(f"loss_{d}" for d in DISTORTIONS)]
    assert frame[["baseline", "split"]].value_counts().to_dict() == {
        ("pca", "val"): 2, ("pca", "test"): 2, ("identity", "val"): 1, ("identity", "test"): 1}


def test_colorize_baseline_is_the_training_mean_chroma_on_real_photographs():
    from cae.data.datasets import load, split
    from cae.train.tasks import rgb_to_ycbcr

    cfg = trial("colorize", data=DataConfig(dataset="photos"))
    data = load(cfg.data)
    frame = compute_baselines(cfg, data, [4096])
    assert frame["baseline"].tolist() == ["mean_chroma", "mean_chroma"]
    assert frame["split"].tolist() == ["val", "test"] and frame["latent_size"].isna().all()
    # by hand: chroma (Cb, Cr) of each image in [0, 1], mean over the training split per
    # pixel, MSE against each test image's chroma
    splits = split(data, cfg.data.val_fraction, cfg.data.split_seed)

    def chroma(u8):
        return rgb_to_ycbcr(u8.double() / 255)[:, 1:]

    mean = chroma(splits.train).mean(0)
    want = (chroma(splits.test) - mean).square().flatten(1).mean(1).mean().item()
    assert frame.loc[frame["split"] == "test", "loss"].item() == pytest.approx(want, rel=1e-4)
    # it is a real reference: a constant at the test split's own mean does at least as well
    own = (chroma(splits.test) - chroma(splits.test).mean(0)).square().mean().item()
    assert own <= want


def test_write_read_round_trip(tmp_path, denoise_frame):
    _, frame = denoise_frame
    assert read_baselines(tmp_path) is None
    path = write_baselines(tmp_path, frame)
    assert path == tmp_path / BASELINES_FILE and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [BASELINES_FILE]  # no temporary left
    pd.testing.assert_frame_equal(read_baselines(tmp_path), frame)
    write_baselines(tmp_path, frame.iloc[:2])  # rewriting replaces
    assert len(read_baselines(tmp_path)) == 2

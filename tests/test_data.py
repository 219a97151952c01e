"""Datasets load as uint8 (N, C, H, W) tensors, splits are clean, missing data fails clearly.

Real data: the embedded sample, and MNIST / Fashion-MNIST from a writable copy of the
offline archives in ``shared/data`` (next to the repository, or ``$CAE_SHARED_DATA``).
KMNIST and CIFAR-10 are not available offline, so their code paths run on tiny fixtures
written here in torchvision's own on-disk layouts.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cae.config.trial import DataConfig
from cae.data import datasets as cdata
from cae.data.datasets import DatasetUnavailable, ImageData, data_root, load, split, to_device


@pytest.fixture
def no_network(monkeypatch):
    """Every URL open fails at once, as it would offline."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uncompressed idx file (MNIST format) of uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


# ---- the embedded sample -----------------------------------------------------------


def test_sample_shapes_dtype_and_balanced_classes():
    d = load(DataConfig(dataset="sample"))
    assert d.name == "sample"
    assert d.train.shape == (4000, 1, 28, 28) and d.test.shape == (1000, 1, 28, 28)
    for t in (d.train, d.test):
        assert t.dtype == torch.uint8 and t.is_contiguous() and t.device.type == "cpu"
    assert d.train.float().std() > 50  # real pictures, not blanks
    assert torch.bincount(d.train_labels).tolist() == [400] * 10
    assert torch.bincount(d.test_labels).tolist() == [100] * 10
    assert d.train_labels.dtype == torch.int64
    assert load(DataConfig(dataset="sample")) is d  # cached


def test_sample_limits_keep_the_first_images():
    full = load(DataConfig(dataset="sample"))
    d = load(DataConfig(dataset="sample", train_limit=100, test_limit=30))
    assert d.train.shape[0] == 100 and d.test.shape[0] == 30
    assert torch.equal(d.train, full.train[:100]) and torch.equal(d.test, full.test[:30])
    assert torch.equal(d.train_labels, full.train_labels[:100])


def test_missing_sample_file_is_unavailable(monkeypatch):
    monkeypatch.setattr(cdata, "SAMPLE_FILE", "no_such_file.npz")
    cdata.clear_cache()
    with pytest.raises(DatasetUnavailable, match="sample.*no_such_file.npz"):
        load(DataConfig(dataset="sample"))
    cdata.clear_cache()


# ---- data root ---------------------------------------------------------------------


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CAE_DATA_DIR", str(tmp_path / "env"))
    assert data_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("CAE_DATA_DIR")
    assert data_root().parts[-2:] == ("cae-sweep", "data")


# ---- splits ------------------------------------------------------------------------


def _numbered(n: int) -> ImageData:
    """Images whose first two pixels spell their index, to track them through a split."""
    imgs = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    idx = torch.arange(n)
    imgs[:, 0, 0, 0], imgs[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
    return ImageData("numbered", train=imgs, test=imgs[:10].clone())


def _ids(t: torch.Tensor) -> set[int]:
    return set((t[:, 0, 0, 0].long() * 256 + t[:, 0, 0, 1].long()).tolist())


def test_split_sizes_disjoint_and_complete():
    d = _numbered(1000)
    s = split(d, 0.1, seed=0)
    assert s.train.shape == (900, 1, 4, 4) and s.val.shape == (100, 1, 4, 4)
    assert _ids(s.train).isdisjoint(_ids(s.val))
    assert _ids(s.train) | _ids(s.val) == set(range(1000))
    assert torch.equal(s.test, d.test)
    assert s.train.dtype == s.val.dtype == torch.uint8


def test_split_is_deterministic_per_seed():
    d = _numbered(1000)
    a, b, c = split(d, 0.2, seed=7), split(d, 0.2, seed=7), split(d, 0.2, seed=8)
    assert torch.equal(a.val, b.val) and torch.equal(a.train, b.train)
    assert _ids(a.val) != _ids(c.val)


def test_split_of_the_sample_and_to_device():
    s = split(load(DataConfig(dataset="sample")), 0.1, seed=0)
    assert (s.train.shape[0], s.val.shape[0], s.test.shape[0]) == (3600, 400, 1000)
    moved = to_device(s, "cpu")
    assert torch.equal(moved.val, s.val)
    meta = to_device(s, "meta")
    assert meta.train.device.type == "meta" and meta.test.shape == s.test.shape


def test_split_keeps_at_least_one_image_on_each_side():
    s = split(_numbered(2), 0.01, seed=0)
    assert s.train.shape[0] == 1 and s.val.shape[0] == 1


# ---- torchvision datasets from the offline archives --------------------------------


def test_mnist_from_archives_without_download(data_copy):
    # download=False: verified archives on disk are extracted, nothing is fetched.
    d = load(DataConfig(dataset="mnist", data_dir=str(data_copy), download=False,
                        train_limit=500, test_limit=200))
    assert d.train.shape == (500, 1, 28, 28) and d.test.shape == (200, 1, 28, 28)
    assert d.train.dtype == torch.uint8 and d.train.is_contiguous()
    assert d.train_labels.shape == (500,) and set(d.train_labels.tolist()) == set(range(10))
    assert d.train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's famous first digits


def test_fashion_mnist_matches_the_embedded_sample(data_copy, no_network):
    full = load(DataConfig(dataset="fashion_mnist", data_dir=str(data_copy), download=True))
    assert full.train.shape == (60000, 1, 28, 28) and full.test.shape == (10000, 1, 28, 28)
    # The sample is a subset of the official files: its recorded indices point at it.
    ref = resources.files("cae").joinpath("sample", cdata.SAMPLE_FILE)
    with resources.as_file(ref) as path, np.load(path) as npz:
        train_index = torch.from_numpy(npz["train_index"]).long()
        test_index = torch.from_numpy(npz["test_index"]).long()
    sample = load(DataConfig(dataset="sample"))
    assert torch.equal(full.train[train_index], sample.train)
    assert torch.equal(full.test[test_index], sample.test)
    assert torch.equal(full.train_labels[train_index], sample.train_labels)


# ---- KMNIST and CIFAR-10 code paths on tiny fixtures -------------------------------


@pytest.fixture
def kmnist_root(tmp_path) -> tuple[Path, dict]:
    """KMNIST/raw with the four idx files torchvision reads (uncompressed, as extracted)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(6) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(4) + 3,
    }
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        _write_idx(raw / name, array)
    return tmp_path, arrays


@pytest.mark.parametrize("download", [False, True])
def test_kmnist_code_path(kmnist_root, download, no_network):
    root, arrays = kmnist_root
    d = load(DataConfig(dataset="kmnist", data_dir=str(root), download=download))
    assert d.train.shape == (6, 1, 28, 28) and d.test.shape == (4, 1, 28, 28)
    assert np.array_equal(d.train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert d.test_labels.tolist() == [3, 4, 5, 6]
    cdata.clear_cache()


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> tuple[Path, np.ndarray]:
    """cifar-10-batches-py with five train batches, a test batch and the meta file.

    torchvision checks each batch file against the md5 of the real file; these fixtures are
    not the real files, so that check (and only that) is replaced by an existence check.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = rng.integers(0, 256, (12, 3 * 32 * 32), dtype=np.uint8)  # R plane, G, B per row
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        entry = {"data": rows[2 * i : 2 * i + 2], "labels": [i, (i + 1) % 10]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    return tmp_path, rows


def test_cifar10_code_path(cifar_root):
    root, rows = cifar_root
    d = load(DataConfig(dataset="cifar10", data_dir=str(root), download=False))
    assert d.train.shape == (10, 3, 32, 32) and d.test.shape == (2, 3, 32, 32)
    assert d.train.dtype == torch.uint8 and d.train.is_contiguous()
    assert np.array_equal(d.train.numpy(), rows[:10].reshape(10, 3, 32, 32))
    assert np.array_equal(d.test.numpy(), rows[10:].reshape(2, 3, 32, 32))
    assert d.train_labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    cdata.clear_cache()


# ---- a dataset that is not there ---------------------------------------------------

EXPECTED = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte.gz",
    "fashion_mnist": "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz",
    "kmnist": "KMNIST/raw/train-labels-idx1-ubyte.gz",
    "cifar10": "cifar-10-python.tar.gz",
}


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_absent_dataset_raises_a_helpful_error(name, download, tmp_path, no_network):
    root = tmp_path / "empty"
    with pytest.raises(DatasetUnavailable) as info:
        load(DataConfig(dataset=name, data_dir=str(root), download=download))
    msg = str(info.value)
    assert f"'{name}'" in msg and str(root) in msg and EXPECTED[name] in msg
    assert "--data-dir" in msg and "CAE_DATA_DIR" in msg
    if download:
        assert "download failed" in msg


# ---- photos: real RGB images offline ------------------------------------------------


def test_photos_are_tiles_of_whole_photographs_held_out_for_testing():
    from cae.config.catalog import DATASETS

    d = load(DataConfig(dataset="photos"))
    info = DATASETS["photos"]
    assert d.train.shape == (info.train_size, *info.shape) and d.train.dtype == torch.uint8
    assert d.test.shape == (info.test_size, *info.shape)
    # every training tile from one of the six training photos, every test tile from the two
    # others: the test error is measured on scenes never seen in training
    assert set(d.train_labels.tolist()) == set(range(len(cdata.PHOTOS_TRAIN)))
    assert set(d.test_labels.tolist()) == {6, 7}
    # real colour: the channels differ, and no tile of the test set occurs in training
    assert (d.train[:, 0].float() - d.train[:, 2].float()).abs().mean() > 10
    train_keys = {t.numpy().tobytes() for t in d.train[::7]}
    assert not any(t.numpy().tobytes() in train_keys for t in d.test)


def test_photos_without_scikit_image_say_how_to_get_them(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "skimage" else real(name, *a))
    cdata.clear_cache()
    with pytest.raises(DatasetUnavailable, match=r"scikit-image is not installed.*photos\]"):
        load(DataConfig(dataset="photos"))

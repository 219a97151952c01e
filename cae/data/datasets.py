"""Datasets as uint8 image tensors, the embedded sample, and the train/val/test splits.

A trial keeps its whole dataset on its device as uint8 ``(N, C, H, W)`` tensors and indexes
batches there (see ``cae.train.tasks``), so this module only has to get the pixels into memory
once: torchvision's dataset classes find, download and md5-check the files, and their
``.data`` arrays are taken as they are, without a per-sample PIL round trip.

``sample`` is a class-balanced subset of the real Fashion-MNIST shipped inside the package
(``cae/sample/fashion_mnist_sample.npz``, built by ``scripts/make_sample.py``), so the
quickstart and the tests need no network. A user's own images (``dataset: folder`` or
``arrays``) are read by ``cae.data.userdata``. ``photos`` cuts 32x32 RGB tiles from the colour
photographs bundled with scikit-image (the ``photos`` extra), so colorization can be tried
on real RGB images offline. Anything that cannot be found or downloaded
becomes :class:`DatasetUnavailable`, whose message says where to put which files.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cae.config.catalog import DATASETS, USER_DATASETS
from cae.config.errors import UserError
from cae.config.trial import DataConfig
from cae.data import userdata
from cae.data.userdata import data_root  # decided there; imported from here too

SAMPLE_FILE = "fashion_mnist_sample.npz"


class DatasetUnavailable(UserError, RuntimeError):
    """A dataset is neither on disk nor downloadable; the message says how to provide it."""


@dataclass
class ImageData:
    """A dataset in memory: uint8 ``(N, C, H, W)`` CPU tensors, plus int64 labels if known."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None


@dataclass
class Splits:
    """uint8 image tensors of the three splits; ``val`` is held out of the training set."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


# ---- loading ---------------------------------------------------------------------------

_CACHE: dict[tuple, ImageData] = {}


def load(cfg: DataConfig) -> ImageData:
    """Load ``cfg.dataset`` (cached in-process, so a second call is free).

    ``train_limit`` / ``test_limit`` keep the first N images of each split; the official
    files are already in random order, so the first N are a fair subset. The returned
    tensors are shared by every caller of the cache: treat them as read-only. A user's
    folder or array file (``cae.data.userdata``) is checked against its files on every call
    and read again when they have changed.
    """
    name = cfg.dataset
    if name in USER_DATASETS:
        return _limit(_load_user(cfg), cfg.train_limit, cfg.test_limit)
    embedded = name in DATASETS and DATASETS[name].torchvision is None
    root = None if embedded else data_root(cfg.data_dir)
    key = (name, str(root) if root else None, cfg.train_limit, cfg.test_limit)
    if key not in _CACHE:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        if name == "sample":
            data = _load_sample()
        elif name == "photos":
            data = _load_photos()
        else:
            data = _load_torchvision(name, root, cfg.download)
        _CACHE[key] = _limit(data, cfg.train_limit, cfg.test_limit)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded dataset (tests use this to load the same name from new roots)."""
    _CACHE.clear()
    userdata.forget()


def _load_user(cfg: DataConfig) -> ImageData:
    """A user's folder or array file as uint8 tensors sharing ``userdata.load``'s arrays (no
    copy here; a folder's are views of its images as read, an array file's a shuffled copy)."""
    train, test, _ = userdata.load(cfg)
    return ImageData(name=cfg.label(), train=torch.from_numpy(train),
                     test=torch.from_numpy(test))


def _limit(data: ImageData, train_limit: int | None, test_limit: int | None) -> ImageData:
    def head(t: torch.Tensor | None, n: int | None) -> torch.Tensor | None:
        return t if t is None or n is None else t[:n].contiguous()

    return ImageData(
        name=data.name,
        train=head(data.train, train_limit),
        test=head(data.test, test_limit),
        train_labels=head(data.train_labels, train_limit),
        test_labels=head(data.test_labels, test_limit),
    )


def _load_sample() -> ImageData:
    ref = resources.files("cae").joinpath("sample", SAMPLE_FILE)
    try:
        with resources.as_file(ref) as path, np.load(path) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetUnavailable(
            f"dataset 'sample': the embedded file cae/sample/{SAMPLE_FILE} could not be read "
            f"({exc}). Reinstall the package, or rebuild it with "
            "`python scripts/make_sample.py --data-dir DATA_ROOT`."
        ) from exc
    return ImageData(
        name="sample",
        train=torch.from_numpy(arrays["x_train"]).unsqueeze(1).contiguous(),  # (N, 1, 28, 28)
        test=torch.from_numpy(arrays["x_test"]).unsqueeze(1).contiguous(),
        train_labels=torch.from_numpy(arrays["y_train"]).long(),
        test_labels=torch.from_numpy(arrays["y_test"]).long(),
    )


# The photos and how they are cut: each scaled so its short side is PHOTO_SIDE pixels, then
# cut into TILE x TILE tiles, overlapping (stride 8) for training, stride 16 for testing.
# Whole photos are held out for testing, so the test error is measured on unseen scenes.
PHOTOS_TRAIN = ("astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png",
                "motorcycle_left.png", "retina.jpg")
PHOTOS_TEST = ("coffee.png", "rocket.jpg")
PHOTO_SIDE, TILE = 256, 32


def _load_photos() -> ImageData:
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    folder = Path(spec.origin).parent / "data" if spec and spec.origin else None
    missing = [f for f in PHOTOS_TRAIN + PHOTOS_TEST if not folder or not (folder / f).is_file()]
    if missing:
        why = "scikit-image is not installed" if folder is None else (
            f"{folder} lacks {', '.join(missing)}")
        raise DatasetUnavailable(
            f"dataset 'photos' cuts its tiles from the photographs bundled with scikit-image, "
            f"and {why}. To fix: pip install 'cae-sweep[photos]' (or scikit-image>=0.22).")

    def tiles(names: tuple[str, ...], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, labels = [], []
        for label, fname in enumerate(names):
            with Image.open(folder / fname) as im:
                im = im.convert("RGB")
                scale = PHOTO_SIDE / min(im.size)
                im = im.resize((round(im.width * scale), round(im.height * scale)),
                               Image.Resampling.BICUBIC)
                x = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # (3, H, W) uint8, a copy
            t = x.unfold(1, TILE, stride).unfold(2, TILE, stride)  # (3, nh, nw, TILE, TILE)
            t = t.permute(1, 2, 0, 3, 4).reshape(-1, 3, TILE, TILE)
            out.append(t)
            labels.append(torch.full((len(t),), label, dtype=torch.int64))
        return torch.cat(out).contiguous(), torch.cat(labels)

    train, train_labels = tiles(PHOTOS_TRAIN, 8)
    test, test_labels = tiles(PHOTOS_TEST, 16)
    return ImageData(name="photos", train=train, test=test, train_labels=train_labels,
                     test_labels=test_labels + len(PHOTOS_TRAIN))


def _load_torchvision(name: str, root: Path, download: bool) -> ImageData:
    import torchvision.datasets as tvd

    cls = getattr(tvd, DATASETS[name].torchvision)
    # Verified archives already on disk only need extracting, which torchvision does in its
    # download step without touching the network; so allow that even when download=False.
    fetch = download or _archives_verified(cls, root)
    try:
        train = cls(root=str(root), train=True, download=fetch)
        test = cls(root=str(root), train=False, download=fetch)
    except (RuntimeError, OSError, EOFError) as exc:  # URLError is an OSError
        raise DatasetUnavailable(_unavailable_message(name, root, download, exc)) from exc
    return ImageData(
        name=name,
        train=_images(train.data),
        test=_images(test.data),
        train_labels=torch.as_tensor(np.asarray(train.targets), dtype=torch.int64),
        test_labels=torch.as_tensor(np.asarray(test.targets), dtype=torch.int64),
    )


def _images(data: Any) -> torch.Tensor:
    """torchvision's ``.data`` -> uint8 ``(N, C, H, W)``: MNIST is (N, H, W), CIFAR (N, H, W, C)."""
    t = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    if t.ndim == 3:
        t = t.unsqueeze(1)  # (N, 1, H, W)
    else:
        t = t.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return t.contiguous()


def _archives_verified(cls: type, root: Path) -> bool:
    from torchvision.datasets.utils import check_integrity

    if hasattr(cls, "resources"):  # the MNIST family
        raw = root / cls.__name__ / "raw"
        return all(check_integrity(str(raw / f), md5) for f, md5 in cls.resources)
    return check_integrity(str(root / cls.filename), cls.tgz_md5)  # CIFAR-10


def expected_files(name: str) -> list[str]:
    """The files torchvision needs for ``name``, relative to the data root."""
    import torchvision.datasets as tvd

    info = DATASETS[name]
    cls, folder = getattr(tvd, info.torchvision), info.folder
    if hasattr(cls, "resources"):
        return [f"{folder}/raw/{f}" for f, _ in cls.resources]
    batches = ", ".join(f for f, _ in cls.train_list + cls.test_list)
    return [cls.filename, f"or the extracted folder {folder}/ ({batches}, batches.meta)"]


def _unavailable_message(name: str, root: Path, download: bool, exc: BaseException) -> str:
    files = "\n".join(f"  {f}" for f in expected_files(name))
    tried = "download failed" if download else "download=False, so nothing was downloaded"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"dataset '{name}' is not available in {root} ({tried}: {reason}).\n"
        f"Expected these files under {root}:\n{files}\n"
        "To fix: download them on a machine with network access (for example with "
        f"torchvision.datasets.{DATASETS[name].torchvision}(root, download=True)) and copy them "
        "into that folder, or point --data-dir / CAE_DATA_DIR at a folder that has them."
    )


def describe(cfg: DataConfig) -> str:
    """``cae data``: the dataset's splits and where they were read from."""
    data = load(cfg)
    if cfg.dataset in USER_DATASETS:  # decoded and cached by now
        return userdata.describe(cfg)
    where = {"sample": "inside the package", "photos": "scikit-image's bundled photographs"}.get(
        cfg.dataset, str(data_root(cfg.data_dir)))
    return (f"{cfg.dataset}: train {tuple(data.train.shape)}, test {tuple(data.test.shape)} "
            f"uint8, from {where}")


# ---- splits ----------------------------------------------------------------------------


def split(data: ImageData, val_fraction: float, seed: int) -> Splits:
    """Hold ``val_fraction`` of the training images out as validation; test is untouched.

    The held-out images are chosen by a permutation from a CPU ``torch.Generator`` seeded
    with ``seed``, so the same seed gives the same split on every machine.
    """
    n = data.train.shape[0]
    if n < 2:
        raise UserError(f"dataset '{data.name}' has {n} training image(s); a split needs 2")
    n_val = userdata.held_out(n, val_fraction)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    return Splits(
        train=data.train[perm[n_val:]].contiguous(),
        val=data.train[perm[:n_val]].contiguous(),
        test=data.test,
    )


def to_device(splits: Splits, device: torch.device | str) -> Splits:
    """The same splits on ``device`` (a no-op copy-free view when already there)."""
    return Splits(
        train=splits.train.to(device),
        val=splits.val.to(device),
        test=splits.test.to(device),
    )

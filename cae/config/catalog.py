"""What the project knows about its datasets and distortions, in one place, without torch.

Every other module (configs, data loading, tasks, the CLI, the benchmarks) reads these
registries instead of repeating the facts, so adding a dataset or a distortion is one entry
here plus its code where it is used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's facts, known without loading it.

    ``torchvision`` is the class name in ``torchvision.datasets`` (None for the datasets
    that need no data root: the embedded sample and the photo tiles); ``folder`` is where
    that class keeps its files under the data root. A user's folder or array file gets one
    too, built from what was found in its files (``cae.data.userdata.dataset_info``).
    """

    name: str
    shape: tuple[int, int, int]  # (channels, height, width)
    train_size: int
    test_size: int
    torchvision: str | None = None
    folder: str | None = None

    @property
    def pixels(self) -> int:
        c, h, w = self.shape
        return c * h * w


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        # A class-balanced subset of real Fashion-MNIST shipped inside the package.
        DatasetInfo("sample", (1, 28, 28), 4000, 1000),
        DatasetInfo("mnist", (1, 28, 28), 60000, 10000, "MNIST", "MNIST"),
        DatasetInfo("fashion_mnist", (1, 28, 28), 60000, 10000, "FashionMNIST", "FashionMNIST"),
        DatasetInfo("kmnist", (1, 28, 28), 60000, 10000, "KMNIST", "KMNIST"),
        DatasetInfo("cifar10", (3, 32, 32), 50000, 10000, "CIFAR10", "cifar-10-batches-py"),
        # 32x32 RGB tiles of the colour photographs that ship with scikit-image (real
        # images, offline; not CIFAR-10): six photos train, two others test.
        DatasetInfo("photos", (3, 32, 32), 6061, 690),
    )
}

# Datasets the user brings (``cae.data.userdata``): every image under a folder, or the images of
# a NumPy array file. Their shapes and sizes are found once, on the driver, and recorded in
# the run's spec; no registry entry can know them.
USER_DATASETS: tuple[str, ...] = ("folder", "arrays")

# The distortions of the denoise task, in the order used for ``index % len`` assignment.
DISTORTIONS: tuple[str, ...] = ("noise", "rotate", "flip", "patch", "brightness")


@dataclass(frozen=True)
class TaskInfo:
    """A task's shapes, known without torch: the image channels it needs (None: any) and
    the model's input and output channels for an image of ``c`` channels (None: ``c``)."""

    name: str
    needs_channels: int | None = None
    model_channels: tuple[int, int] | None = None

    def channels(self, c: int) -> tuple[int, int]:
        return self.model_channels or (c, c)


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("reconstruct"),
    TaskInfo("denoise"),
    TaskInfo("colorize", needs_channels=3, model_channels=(1, 2)),  # Y in, CbCr out
)}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``, or a ValueError listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]

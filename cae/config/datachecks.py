"""The checks of a trial against its images, run while a :class:`TrialConfig` validates.

A task may need colour images (colorize learns chroma from luma), and a user's dataset must
fill one batch after the validation split. For a registry dataset the catalog's facts
answer; for a user's folder or array file these checks look at the files through
``cae.data.userdata`` (the facts recorded in the run's spec, else the files' headers, never
the pixels), which is why they live apart from the models that call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cae.config.catalog import USER_DATASETS, DatasetInfo, TaskInfo

if TYPE_CHECKING:
    from cae.config.trial import DataConfig, TrialConfig


def check_channels(data: DataConfig, task: TaskInfo, channels: int, name: str) -> None:
    """A task that needs RGB images (colorize learns chroma from luma) gets RGB images that
    hold colour."""
    if task.needs_channels is None:
        return
    user = data.dataset in USER_DATASETS
    if channels != task.needs_channels:
        hint = ("set data.channels: 3 only if the images are in colour" if user
                else "use cifar10 or photos")
        raise ValueError(
            f"task '{task.name}' needs {task.needs_channels}-channel images"
            f"{' (RGB)' if task.needs_channels == 3 else ''}, but '{name}' has {channels} "
            f"channel(s); {hint}")
    if user and task.needs_channels == 3:
        from cae.data.userdata import facts

        if facts(data).get("grayscale"):
            raise ValueError(f"task '{task.name}' needs images in colour, but every image of "
                             f"'{name}' ({data.path}) is grayscale: converted to RGB they hold "
                             "no colour to learn")


def check_enough(cfg: TrialConfig, info: DatasetInfo) -> None:
    """A user's dataset must fill one batch after the validation split, and test on one."""
    n, _ = cfg.data.sizes()
    n_val = max(1, round(n * cfg.data.val_fraction))
    if n - n_val < cfg.batch_size:
        raise ValueError(
            f"dataset '{info.name}' has {n:,} training images ({cfg.data.path}), "
            f"{n - n_val:,} after the validation split ({cfg.data.val_fraction:g}): fewer than "
            f"one batch ({cfg.batch_size}); add images or lower batch_size")
    if info.test_size < 1:
        raise ValueError(f"dataset '{info.name}' has no test images ({cfg.data.test_path})")

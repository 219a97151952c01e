"""The models of one trial's configuration: model, data, task, and the trial itself.

Every config is a pydantic model with ``extra="forbid"``, so a misspelt key is an error that
names the field instead of a silently ignored setting. A :class:`TrialConfig` is complete
and self-checking: after validation its model knows its input and output shapes (taken from
the dataset and the task) and its architecture has been checked for impossible shapes, so a
bad grid point fails here, before any training starts. A sweep's spec is
``cae.config.spec``; a grid point applied to a base trial ``cae.config.points``; reading
YAML ``cae.config.yamlfile``; the checks that look at a user's files
``cae.config.datachecks``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cae.config.base import Strict
from cae.config.catalog import DATASETS, DISTORTIONS, TASKS, USER_DATASETS, DatasetInfo
from cae.config.datachecks import check_channels, check_enough
from cae.config.optim import OptimizerConfig, ScheduleConfig
from cae.config.presets import preset_dict
from cae.model.plan import plan

DatasetName = Literal[tuple(DATASETS) + USER_DATASETS]  # type: ignore[valid-type]
Distortion = Literal[DISTORTIONS]  # type: ignore[valid-type]

# Upper bounds of the model space: far beyond any useful CAE of these image sizes, low
# enough that checking a grid point is instant and a typo (convs: 1000000000) is refused.
MAX_STAGES, MAX_CONVS, MAX_CHANNELS, MAX_KERNEL = 16, 64, 4096, 64
MAX_DENSE_LAYERS, MAX_WIDTH = 32, 1 << 20
MAX_IMAGE_SIZE = 4096

# A trial's shuffling of epoch e is seeded with ``seed * SEED_STRIDE + e``: a stream that
# resumes exactly and differs between seeds. The repeats of a grid point shift the seed by
# the same stride (``cae.config.points``), so their streams never overlap either.
SEED_STRIDE = 1_000_003


class ModelConfig(Strict):
    """One convolutional autoencoder of the model space.

    The encoder is a list of stages, one per entry of ``channels``: ``convs`` conv layers,
    then an optional 2x2 max-pool, batchnorm and dropout. The bottleneck is either ``conv``
    (the latent is the last feature map, optionally produced by one more conv with
    ``latent_channels``) or ``dense`` (flatten, the ``dense`` stack, ``latent_dim``, then
    the mirror). The decoder mirrors the stages in reverse: batchnorm, upsample back to the
    stage's input size, ``convs`` convs to the stage's channels; ``output_conv`` adds a
    separate conv to the output channels, otherwise the last decoder conv is the output.

    ``latent_dim`` is the width of a dense bottleneck; a conv bottleneck ignores it.
    ``preset: NAME`` starts from a named preset and overrides the fields given beside it.
    ``in_channels``, ``out_channels`` and ``image_size`` are filled in from the dataset and
    task when a trial is validated.
    """

    preset: str | None = None
    in_channels: int | None = Field(None, ge=1)
    out_channels: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=1)

    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1,
                                max_length=MAX_STAGES)
    convs: int | list[int] = 1
    kernel: int = Field(3, ge=1, le=MAX_KERNEL)
    stride: int = Field(1, ge=1, le=MAX_KERNEL)
    padding: int | Literal["same"] = "same"
    pool: bool | list[bool] = True
    batchnorm: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dropout_std: float = Field(0.0, ge=0.0)
    activation: Literal["relu", "leaky_relu", "elu", "gelu", "silu"] = "relu"

    bottleneck: Literal["conv", "dense"] = "dense"
    latent_channels: int | None = Field(None, ge=1, le=MAX_CHANNELS)
    latent_kernel: int | None = Field(None, ge=1, le=MAX_KERNEL)
    latent_padding: int | Literal["same"] | None = None
    dense: list[int] = Field(default_factory=list, max_length=MAX_DENSE_LAYERS)
    latent_dim: int = Field(16, ge=1, le=MAX_WIDTH)
    dense_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    reshape_channels: int | None = Field(None, ge=1, le=MAX_CHANNELS)

    decoder: Literal["upsample_conv", "conv_transpose"] = "upsample_conv"
    decoder_kernel: int | None = Field(None, ge=1, le=MAX_KERNEL)
    output_conv: bool = True
    output_activation: Literal["sigmoid", "linear"] = "sigmoid"
    init: Literal["he_uniform", "glorot_uniform", "default"] = "default"

    activity_l1: float = Field(0.0, ge=0.0)
    activity_l2: float = Field(0.0, ge=0.0)
    edge_l2: float = Field(0.0, ge=0.0)
    edge_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    allow_overcomplete: bool = False

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            if not isinstance(data["preset"], str):
                raise ValueError(f"preset must be a preset's name, not {data['preset']!r}")
            merged = preset_dict(data["preset"])
            merged.update(data)
            return merged
        return data

    @model_validator(mode="after")
    def _check_lists(self) -> ModelConfig:
        n = len(self.channels)
        for name in ("convs", "pool"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != n:
                raise ValueError(
                    f"{name} has {len(value)} entries but channels has {n} stages"
                )
        if any(not 1 <= c <= MAX_CHANNELS for c in self.channels):
            raise ValueError(f"channels must all be between 1 and {MAX_CHANNELS}")
        if any(not 1 <= c <= MAX_CONVS for c in self.stage_convs):
            raise ValueError(f"convs must be between 1 and {MAX_CONVS} in every stage")
        if any(not 1 <= w <= MAX_WIDTH for w in self.dense):
            raise ValueError(f"dense widths must all be between 1 and {MAX_WIDTH}")
        if isinstance(self.padding, int) and not 0 <= self.padding <= MAX_KERNEL:
            raise ValueError(f"padding must be 'same' or between 0 and {MAX_KERNEL}")
        if self.bottleneck == "conv" and self.dense:
            raise ValueError(
                "dense applies to bottleneck 'dense'; a conv bottleneck's latent is its last "
                "feature map (set latent_channels)"
            )
        if self.decoder_k % 2 == 0:
            raise ValueError(
                f"decoder_kernel must be odd (got {self.decoder_k}) so that decoder convs "
                "keep their size; set decoder_kernel explicitly"
            )
        return self

    @property
    def stage_convs(self) -> list[int]:
        c = self.convs
        return list(c) if isinstance(c, list) else [c] * len(self.channels)

    @property
    def stage_pools(self) -> list[bool]:
        p = self.pool
        return list(p) if isinstance(p, list) else [p] * len(self.channels)

    @property
    def decoder_k(self) -> int:
        return self.decoder_kernel if self.decoder_kernel is not None else self.kernel


class DataFacts(Strict):
    """What a user's folder or array file holds, found once on the driver (``cae.data.userdata``)
    and recorded in a run's spec beside the settings that read it, so that a trial validates
    its config on any node without the files (and ``cae status`` and ``cae report`` later).
    ``images`` is how many were read from ``path``, ``test_images`` from ``test_path``;
    ``skipped`` names the unreadable files left out (``skip_unreadable``)."""

    dataset: str
    path: str
    test_path: str | None = None
    image_size: int | list[int] | None = None
    channels: int | None = None
    layout: str = "auto"
    skip_unreadable: bool = False
    shape: list[int] = Field(min_length=3, max_length=3)  # (C, H, W) after conversion
    images: int = Field(ge=0)
    test_images: int | None = Field(None, ge=0)
    grayscale: bool | None = None  # every source image grayscale (None: not looked at yet)
    skipped: list[str] = Field(default_factory=list)
    test_skipped: list[str] = Field(default_factory=list)
    fingerprint: str = ""  # of the files as read (paths, sizes, modification times)


class DataConfig(Strict):
    """Which images, where they live, and how they are split.

    ``dataset: folder`` reads every image under ``path`` (any depth), ``dataset: arrays`` a
    .npy/.npz file (see ``cae.data.userdata``): ``channels`` (1 or 3; default 1 if every image
    is grayscale, else 3) and ``image_size`` (a number or [height, width]; a centred
    resize-and-crop keeping the aspect ratio) say what they become; ``test_path`` holds the
    test images, else ``test_fraction`` of them is held out (before the validation split);
    ``layout`` says how an array's axes are laid out (``auto``, ``nhw``, ``nhwc``,
    ``nchw``); ``skip_unreadable`` leaves out files that cannot be read instead of refusing
    them. ``path`` and ``test_path`` are made absolute. ``facts`` is filled in by a sweep.
    """

    dataset: DatasetName = "sample"
    data_dir: str | None = None
    download: bool = True
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    train_limit: int | None = Field(None, ge=2)
    test_limit: int | None = Field(None, ge=1)
    path: str | None = None
    test_path: str | None = None
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    image_size: int | list[int] | None = None
    channels: Literal[1, 3] | None = None
    layout: Literal["auto", "nhw", "nhwc", "nchw"] = "auto"
    skip_unreadable: bool = False
    facts: list[DataFacts] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_user_data(self) -> DataConfig:
        if self.dataset not in USER_DATASETS:
            given = [k for k in ("path", "test_path", "image_size", "channels")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"data.{given[0]} is read for dataset "
                                 f"{' or '.join(USER_DATASETS)}, not {self.dataset!r}")
            return self
        if not self.path:
            raise ValueError(f"dataset {self.dataset!r} needs data.path (the "
                             f"{'folder of images' if self.dataset == 'folder' else 'array file'})")
        size = self.image_size
        if size is not None and not (
                (isinstance(size, int) and 1 <= size <= MAX_IMAGE_SIZE)
                or (isinstance(size, list) and len(size) == 2
                    and all(1 <= v <= MAX_IMAGE_SIZE for v in size))):
            raise ValueError(f"data.image_size must be a number or [height, width], each 1 to "
                             f"{MAX_IMAGE_SIZE} (got {size!r})")
        self.path = absolute_path(self.path)
        self.test_path = absolute_path(self.test_path) if self.test_path else None
        return self

    def source_key(self) -> str:
        """What decides which images are loaded (not how they are split): trials with the
        same key share one copy of the dataset."""
        key = [self.dataset, self.data_dir, self.train_limit, self.test_limit]
        if self.dataset in USER_DATASETS:
            key += [self.path, self.test_path, self.test_fraction, self.image_size,
                    self.channels, self.layout, self.skip_unreadable]
        return json.dumps(key)

    def info(self) -> DatasetInfo:
        """The images' shape (C, H, W) and split sizes (before the limits): the registry's
        entry, or what a user's folder or array file was found to hold. Every module that
        needs these facts asks here."""
        if self.dataset in DATASETS:
            return DATASETS[self.dataset]
        from cae.data.userdata import dataset_info

        return dataset_info(self)

    def sizes(self) -> tuple[int, int]:
        """(training, test) images after ``train_limit`` and ``test_limit``: what a trial
        loads (the training images before the validation split)."""
        info = self.info()
        return (min(info.train_size, self.train_limit or info.train_size),
                min(info.test_size, self.test_limit or info.test_size))

    def label(self) -> str:
        """The dataset's name in tables and figures: the registry name, or
        ``folder:NAME`` / ``arrays:FILE`` for a user's data."""
        if self.dataset in DATASETS:
            return self.dataset
        return f"{self.dataset}:{_basename(self.path)}"


def absolute_path(path: str) -> str:
    """A user's path as DataConfig keeps it: ``~`` expanded, made absolute (not resolved:
    the same text on every node, whether the file exists there or not)."""
    return os.path.abspath(os.path.expanduser(path))


def _basename(path: str) -> str:
    return os.path.basename(path.rstrip("/")) or path


class TaskConfig(Strict):
    """What the autoencoder learns: reconstruct, denoise (undo distortions) or colorize.

    For ``denoise`` each sample gets one distortion, ``distortions[index % len]`` (so each is
    equally frequent), with its random strength drawn from a seeded generator; validation and
    test inputs are distorted once with ``eval_seed`` so every trial and every epoch sees the
    same inputs.
    """

    name: Literal[tuple(TASKS)] = "reconstruct"  # type: ignore[valid-type]
    distortions: list[Distortion] = Field(default_factory=lambda: list(DISTORTIONS), min_length=1)
    noise_std: float = Field(0.3, ge=0.0)
    rotation_deg: float = Field(45.0, ge=0.0, le=180.0)
    flip: Literal["horizontal", "vertical", "both"] = "horizontal"
    patch_size: int = Field(10, ge=1, le=4096)
    brightness: float = Field(0.5, ge=0.0, lt=1.0)
    eval_seed: int = 1234


class TrialConfig(Strict):
    """Everything one training run needs: model, data, task and optimisation settings."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(None, gt=0.0)  # the gradient's largest norm, per step
    batch_size: int = Field(128, ge=1, le=1 << 20)
    eval_batch_size: int = Field(1024, ge=1, le=1 << 20)
    max_epochs: int = Field(10, ge=1, le=100_000)
    patience: int | None = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    loss: Literal["mse", "bce", "l1"] = "mse"
    seed: int = 0  # the weights' initialisation and, with SEED_STRIDE, each epoch's order
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast of the training forward pass; ``auto``: on a CUDA GPU with bf16, fp32
    # elsewhere (see cae.train.trainer.resolve_precision). Weights, optimiser state, the loss and
    # every reported error stay fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # ``torch.compile`` of the model: ``none`` (eager), ``default``, or ``reduce-overhead``
    # (CUDA graphs on a GPU); ``true``/``false`` of older specs mean default/none.
    compile: Literal["none", "default", "reduce-overhead"] = "none"

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "default" if value else "none"
        return value

    @model_validator(mode="after")
    def _resolve_shapes(self) -> TrialConfig:
        info = self.data.info()  # a user's data: recorded facts, else its files' headers
        c, h, w = info.shape
        name = info.name
        if h != w:
            raise ValueError(f"dataset '{name}' has {w}x{h} images (width x height), and the "
                             f"models take square ones: set data.image_size to one number "
                             f"(a centred crop), e.g. {min(h, w)}")
        task = TASKS[self.task.name]
        check_channels(self.data, task, c, name)
        cin, cout = task.channels(c)
        want = {"in_channels": cin, "out_channels": cout, "image_size": h}
        for key, value in want.items():
            given = getattr(self.model, key)
            if given is not None and given != value:
                raise ValueError(
                    f"model.{key} is {given} but dataset '{name}' with task "
                    f"'{self.task.name}' needs {value}"
                )
            setattr(self.model, key, value)
        if self.schedule.warmup_epochs >= self.max_epochs:
            raise ValueError(f"schedule.warmup_epochs is {self.schedule.warmup_epochs}: it "
                             f"must be below max_epochs ({self.max_epochs})")
        if self.loss == "bce" and self.model.output_activation != "sigmoid":
            raise ValueError("loss 'bce' needs model.output_activation 'sigmoid'")
        if self.data.dataset in USER_DATASETS:
            check_enough(self, info)
        plan(self.model)  # raises ValueError naming the impossible layer
        return self


def get_preset(name: str) -> ModelConfig:
    """A named preset as a validated ModelConfig."""
    return ModelConfig.model_validate(preset_dict(name))

"""What the autoencoder learns: uint8 image batches -> (input, target) float tensors.

Three tasks, one small class each, all built by :func:`make_task`:

- ``reconstruct``: input = target = the image in [0, 1].
- ``denoise``: target = the clean image; input = the image with one distortion, chosen by
  ``index % len(distortions)`` so each distortion is equally frequent, with its random
  strength drawn from the caller's generator. The distortion's position is returned as the
  sample's *group*, so errors can be reported per distortion.
- ``colorize``: RGB -> YCbCr (ITU-R BT.601 full range, as in JPEG); input = luma Y,
  target = chroma CbCr. :meth:`Colorize.rgb_error` re-joins Y with a predicted chroma and
  measures the error in RGB, the space a person judges colours in.

Everything runs on the batch's device and is vectorised over the batch: each distortion is
computed for the whole batch and the right one picked per sample with ``torch.where``, so
there is no per-sample Python and no host synchronisation on the hot path.
Validation and test inputs come from :meth:`Task.eval_inputs`: prepared once, from a fixed
seed, identically for every trial and epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from cae.config.catalog import DISTORTIONS
from cae.config.trial import TaskConfig

Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


# ---- colour spaces ---------------------------------------------------------------------

# ITU-R BT.601 full range (JFIF / PIL): Y in [0, 1], Cb and Cr centred at 0.5.
_RGB_TO_YCBCR = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ],
    dtype=torch.float64,
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)  # 1.402, -0.344136, -0.714136, 1.772
_CHROMA_OFFSET = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)


@cache
def _colour_constants(inverse: bool, device: torch.device, dtype: torch.dtype):
    """The matrix and offset on ``device``, copied there once (a copy per batch would stall
    a GPU stream)."""
    m = _YCBCR_TO_RGB if inverse else _RGB_TO_YCBCR
    return m.to(device, dtype), _CHROMA_OFFSET.to(device, dtype).view(1, 3, 1, 1)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> YCbCr (B, 3, H, W) in [0, 1] (BT.601 full range)."""
    m, off = _colour_constants(False, x.device, x.dtype)
    return torch.einsum("ij,bjhw->bihw", m, x) + off


def ycbcr_to_rgb(x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """YCbCr (B, 3, H, W) -> RGB (B, 3, H, W), clamped to [0, 1] unless ``clamp=False``.

    Clamping matters for predicted chroma, which can leave the RGB gamut.
    """
    m, off = _colour_constants(True, x.device, x.dtype)
    rgb = torch.einsum("ij,bjhw->bihw", m, x - off)
    return rgb.clamp(0.0, 1.0) if clamp else rgb


# ---- distortions (each takes and returns float (B, C, H, W) in [0, 1]) -------------------


def add_noise(x: torch.Tensor, std: float, gen: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std``, clamped back to [0, 1]."""
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0.0, 1.0)


def rotate_by(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by ``degrees[b]`` (counter-clockwise, as
    torchvision's ``rotate``), bilinear, filling with black. ``degrees`` is (B,)."""
    b, _, h, w = x.shape
    rad = degrees.to(x.device, x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # affine_grid maps output to input positions in [-1, 1] coordinates; the h/w factors keep
    # the rotation rigid on non-square images.
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], dim=1),
            torch.stack([sin * w / h, cos, torch.zeros_like(cos)], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotate(x: torch.Tensor, max_deg: float, gen: torch.Generator | None) -> torch.Tensor:
    """Rotate each image by an angle drawn uniformly from [-max_deg, max_deg]."""
    u = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype)
    return rotate_by(x, (2.0 * u - 1.0) * max_deg)


def flip(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Mirror every image: ``horizontal`` (left-right), ``vertical`` (up-down) or ``both``."""
    dims = {"horizontal": [-1], "vertical": [-2], "both": [-2, -1]}[mode]
    return torch.flip(x, dims)


def black_patch(x: torch.Tensor, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """Black out a ``size`` x ``size`` square (clipped to the image) at a random position,
    entirely inside each image."""
    b, _, h, w = x.shape
    ph, pw = min(size, h), min(size, w)
    top = torch.randint(0, h - ph + 1, (b,), generator=gen, device=x.device).view(b, 1, 1)
    left = torch.randint(0, w - pw + 1, (b,), generator=gen, device=x.device).view(b, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + ph) & (cols >= left) & (cols < left + pw)  # (B, H, W)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def scale_brightness(x: torch.Tensor, amount: float, gen: torch.Generator | None) -> torch.Tensor:
    """Multiply each image by a factor drawn uniformly from [1 - amount, 1 + amount], clamped."""
    u = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype)
    factor = (1.0 + amount * (2.0 * u - 1.0)).view(-1, 1, 1, 1)
    return (x * factor).clamp(0.0, 1.0)


# One function per distortion of ``cae.config.catalog.DISTORTIONS``: (x, task config, generator).
DISTORTION_FNS: dict[str, Callable[[torch.Tensor, TaskConfig, torch.Generator | None],
                                   torch.Tensor]] = {
    "noise": lambda x, cfg, gen: add_noise(x, cfg.noise_std, gen),
    "rotate": lambda x, cfg, gen: random_rotate(x, cfg.rotation_deg, gen),
    "flip": lambda x, cfg, gen: flip(x, cfg.flip),
    "patch": lambda x, cfg, gen: black_patch(x, cfg.patch_size, gen),
    "brightness": lambda x, cfg, gen: scale_brightness(x, cfg.brightness, gen),
}
assert tuple(DISTORTION_FNS) == DISTORTIONS, "every distortion of the catalog needs a function"


# ---- tasks -----------------------------------------------------------------------------


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1], same shape and device."""
    return images.to(torch.float32).div_(255.0)


class Task:
    """Base class: turns uint8 batches into ``(input, target, group)``; see the module doc."""

    name = "task"
    # The reference errors of this task (``cae.results.baselines``) and the titles of its pictures'
    # columns (input, output, target).
    references: tuple[str, ...] = ("pca",)
    picture_titles = ("input", "output", "target")

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @property
    def group_names(self) -> list[str] | None:
        """Names of the per-sample groups (distortions), or None when there are none."""
        return None

    def extra_errors(self, x: torch.Tensor, out: torch.Tensor,
                     y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample errors (B,) reported beside the loss, by name (none by default)."""
        return {}

    def visible(self, x: torch.Tensor, out: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input, output and target as a person sees them: images in [0, 1]."""
        return x, out.float().clamp(0, 1), y

    def clean_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> the model's input for these images as they are, float32 on
        their device: the image in [0, 1] (a denoiser's undistorted input). ``cae encode``
        prepares images with this, so they reach a model exactly as in training."""
        return _to_unit(images)

    def batch(
        self, images: torch.Tensor, index: torch.Tensor, generator: torch.Generator | None = None
    ) -> Batch:
        """``images`` uint8 (B, C, H, W) and their dataset ``index`` (B,) -> float32
        ``(input (B, Cin, H, W), target (B, Cout, H, W), group (B,) or None)`` on the images'
        device. Random draws come from ``generator``, which must live on that device."""
        raise NotImplementedError

    def eval_inputs(self, images: torch.Tensor, seed: int, chunk: int = 4096) -> Batch:
        """A whole validation or test split prepared once, the same on every call.

        The split is processed on the CPU in fixed chunks of ``chunk`` images, in order, with
        index ``arange(N)`` and a CPU generator seeded with ``seed``, then moved to the
        images' device. So the result depends only on the images, ``seed`` and ``chunk``:
        not on any batch size, and not on whether the trial runs on a CPU or a GPU (their
        random streams differ), so every trial of a sweep sees the same inputs.
        """
        gen = torch.Generator().manual_seed(seed)
        cpu = images.cpu()
        n = cpu.shape[0]
        parts = [
            self.batch(cpu[s : s + chunk], torch.arange(s, min(s + chunk, n)), gen)
            for s in range(0, n, chunk)
        ]
        x = torch.cat([p[0] for p in parts])
        shared = all(p[0] is p[1] for p in parts)  # reconstruct: one tensor, not two
        y = x if shared else torch.cat([p[1] for p in parts])
        g = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        dev = images.device
        x_dev = x.to(dev)
        return x_dev, (x_dev if shared else y.to(dev)), (None if g is None else g.to(dev))


class Reconstruct(Task):
    """Input = target = the image."""

    name = "reconstruct"

    def batch(self, images, index, generator=None) -> Batch:
        x = self.clean_input(images)
        return x, x, None


class Denoise(Task):
    """Input = a distorted image, target = the clean one, group = the distortion's position."""

    name = "denoise"
    references = ("pca", "identity")
    picture_titles = ("distorted input", "output", "clean target")

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self.distortions = list(cfg.distortions)

    @property
    def group_names(self) -> list[str]:
        return list(self.distortions)

    def distort(self, kind: str, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Apply one distortion, with this task's strength, to every image of ``x``."""
        return DISTORTION_FNS[kind](x, self.cfg, gen)

    def batch(self, images, index, generator=None) -> Batch:
        clean = _to_unit(images)  # (B, C, H, W)
        group = index.to(images.device) % len(self.distortions)  # (B,)
        x = clean
        # Every distortion is computed for the whole batch and selected per sample: a fixed
        # number of random draws per batch, and no data-dependent shapes (no host sync).
        for k, kind in enumerate(self.distortions):
            chosen = (group == k).view(-1, 1, 1, 1)
            x = torch.where(chosen, self.distort(kind, clean, generator), x)
        return x, clean, group


class Colorize(Task):
    """Input = luma Y (B, 1, H, W), target = chroma CbCr (B, 2, H, W) of an RGB image."""

    name = "colorize"
    references = ("mean_chroma",)
    picture_titles = ("gray input", "prediction (RGB)", "truth (RGB)")

    def extra_errors(self, x, out, y) -> dict[str, torch.Tensor]:
        """The error in RGB, the space a person judges colours in (``rgb_error``)."""
        return {"rgb_mse": self.rgb_error(x, out.float(), y)}

    def visible(self, x, out, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gray input, and prediction and truth re-joined with it in RGB."""
        return x, self.to_rgb(x, out), self.to_rgb(x, y)

    def clean_input(self, images: torch.Tensor) -> torch.Tensor:
        """The luma Y (B, 1, H, W) of RGB images, as :meth:`batch` makes its input."""
        return self._ycbcr(images)[:, :1].contiguous()

    def batch(self, images, index, generator=None) -> Batch:
        ycbcr = self._ycbcr(images)  # input and target from one conversion
        return ycbcr[:, :1].contiguous(), ycbcr[:, 1:].contiguous(), None

    @staticmethod
    def _ycbcr(images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, 3, H, W) -> YCbCr (B, 3, H, W) float32 in [0, 1]."""
        if images.shape[1] != 3:
            raise ValueError(f"colorize needs RGB images (B, 3, H, W), got {tuple(images.shape)}")
        return rgb_to_ycbcr(_to_unit(images))

    @staticmethod
    def rgb_error(
        y: torch.Tensor, pred_cbcr: torch.Tensor, target_cbcr: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample MSE (B,) in RGB between Y + predicted chroma and Y + true chroma.

        Both are converted back to RGB and clamped to [0, 1] first, so the error is the one
        of the pictures a person would see; the true side is the original image (up to
        rounding). Pass the model's input ``y`` (B, 1, H, W) and chroma (B, 2, H, W).
        """
        y = y.float()
        pred = ycbcr_to_rgb(torch.cat([y, pred_cbcr.float()], dim=1))  # (B, 3, H, W)
        true = ycbcr_to_rgb(torch.cat([y, target_cbcr.float()], dim=1))
        return (pred - true).square().flatten(1).mean(1)

    @staticmethod
    def to_rgb(y: torch.Tensor, cbcr: torch.Tensor) -> torch.Tensor:
        """Re-join luma (B, 1, H, W) and chroma (B, 2, H, W) into RGB (B, 3, H, W) for display."""
        return ycbcr_to_rgb(torch.cat([y.float(), cbcr.float()], dim=1))


_TASKS: dict[str, type[Task]] = {t.name: t for t in (Reconstruct, Denoise, Colorize)}


def make_task(cfg: TaskConfig) -> Task:
    """The task object for ``cfg.name``."""
    return _TASKS[cfg.name](cfg)

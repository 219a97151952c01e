"""Tasks turn uint8 batches into the right (input, target, group), vectorised and seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from cae.config.catalog import DISTORTIONS
from cae.config.trial import DataConfig, TaskConfig
from cae.data.datasets import load
from cae.train.tasks import (
    Colorize,
    Denoise,
    Reconstruct,
    make_task,
    rgb_to_ycbcr,
    rotate_by,
    ycbcr_to_rgb,
)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load(DataConfig(dataset="sample")).train[:60]  # (60, 1, 28, 28) uint8


def photos() -> list[np.ndarray]:
    """Real RGB photographs shipped with scikit-image (offline)."""
    import skimage.data as skdata
    return [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]


def rgb_batch(size: int = 32) -> torch.Tensor:
    """(B, 3, size, size) uint8 tiles cut from the photographs, like CIFAR-10 images."""
    tiles = []
    for photo in photos():
        t = torch.from_numpy(photo).permute(2, 0, 1)  # (3, H, W)
        for i in range(4):
            tiles.append(t[:, 40 * i : 40 * i + size, 50 * i : 50 * i + size])
    return torch.stack(tiles).contiguous()


def denoise(*kinds: str, **kw) -> Denoise:
    return make_task(TaskConfig(name="denoise", distortions=list(kinds), **kw))


def run(task, imgs: torch.Tensor, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return task.batch(imgs, torch.arange(imgs.shape[0]), gen)


def const(value: int, b: int = 40, c: int = 1, size: int = 28) -> torch.Tensor:
    return torch.full((b, c, size, size), value, dtype=torch.uint8)


# ---- make_task and reconstruct ------------------------------------------------------


def test_make_task_kinds_and_group_names():
    assert isinstance(make_task(TaskConfig(name="reconstruct")), Reconstruct)
    assert isinstance(make_task(TaskConfig(name="colorize")), Colorize)
    task = make_task(TaskConfig(name="denoise"))
    assert isinstance(task, Denoise) and task.group_names == list(DISTORTIONS)
    assert make_task(TaskConfig(name="reconstruct")).group_names is None
    assert make_task(TaskConfig(name="colorize")).group_names is None


def test_reconstruct_is_identity(images):
    x, y, g = run(make_task(TaskConfig(name="reconstruct")), images)
    assert g is None and x.dtype == torch.float32 and x.shape == images.shape
    assert torch.equal(x, y) and torch.equal(x, images.float() / 255)


# ---- each distortion does what it says ----------------------------------------------


def test_noise_has_the_configured_std():
    clean = const(128, b=50)
    x, y, g = run(denoise("noise", noise_std=0.1), clean)
    diff = x - y
    assert (diff != 0).float().mean() > 0.99
    assert abs(diff.std().item() - 0.1) < 0.005 and abs(diff.mean().item()) < 0.005
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(g, torch.zeros(50, dtype=torch.long))


@pytest.mark.parametrize("mode, dims", [("horizontal", [-1]), ("vertical", [-2]),
                                        ("both", [-2, -1])])
def test_flip_equals_torch_flip(images, mode, dims):
    x, y, _ = run(denoise("flip", flip=mode), images)
    assert torch.equal(x, torch.flip(y, dims))


def test_patch_is_a_black_square_and_the_rest_untouched():
    white = const(255, b=30)
    x, _, _ = run(denoise("patch", patch_size=7), white)
    black = x[:, 0] == 0  # (B, H, W)
    assert black.flatten(1).sum(1).tolist() == [49] * 30
    assert ((x == 0) | (x == 1)).all()  # everything else is the untouched white
    for mask in black:  # the black pixels form one 7x7 square
        rows, cols = mask.nonzero(as_tuple=True)
        assert rows.max() - rows.min() == 6 and cols.max() - cols.min() == 6
    positions = {tuple(m.nonzero()[0].tolist()) for m in black}
    assert len(positions) > 5  # random positions


def test_patch_larger_than_the_image_blacks_it_out():
    x, _, _ = run(denoise("patch", patch_size=40), const(255, b=3))
    assert (x == 0).all()


def test_patch_covers_every_channel():
    x, _, _ = run(denoise("patch", patch_size=5), const(200, b=4, c=3, size=32))
    black = x == 0  # (B, 3, H, W)
    assert torch.equal(black[:, 0], black[:, 1]) and torch.equal(black[:, 0], black[:, 2])


def test_brightness_scales_each_image_by_one_factor():
    clean = const(100, b=40)
    x, y, _ = run(denoise("brightness", brightness=0.5), clean)
    ratio = (x / y).flatten(1)  # (B, H*W)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6)
    factors = ratio[:, 0]
    assert factors.min() >= 0.5 and factors.max() <= 1.5 and factors.std() > 0.1


def test_brightness_clamps_to_one():
    x, _, _ = run(denoise("brightness", brightness=0.9), const(250, b=20))
    assert x.max() <= 1.0 and (x == 1.0).any()


@pytest.mark.parametrize("angle", [30.0, -45.0, 90.0, 137.0])
def test_rotate_by_matches_torchvision(images, angle):
    x = images.float() / 255
    ours = rotate_by(x, torch.full((x.shape[0],), angle))
    ref = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
    assert (ours - ref).abs().max() < 1e-4


def test_rotate_by_180_is_a_double_flip(images):
    x = images.float() / 255
    assert torch.allclose(rotate_by(x, torch.full((60,), 180.0)), torch.flip(x, [-2, -1]),
                          atol=1e-5)


def test_rotate_task_draws_angles_within_range(images):
    x, y, _ = run(denoise("rotate", rotation_deg=30.0), images, seed=5)
    angles = (2 * torch.rand(60, generator=torch.Generator().manual_seed(5)) - 1) * 30.0
    assert angles.abs().max() <= 30.0 and angles.std() > 5
    assert torch.allclose(x, rotate_by(y, angles), atol=1e-6)
    x0, y0, _ = run(denoise("rotate", rotation_deg=0.0), images)
    assert torch.allclose(x0, y0, atol=1e-5)


# ---- balance, groups, determinism ----------------------------------------------------


def test_distortions_are_assigned_by_index_modulo(images):
    task = make_task(TaskConfig(name="denoise"))  # all five
    index = torch.arange(100, 160)
    x, y, g = task.batch(images, index, torch.Generator().manual_seed(0))
    assert torch.equal(g, index % 5) and g.dtype == torch.long
    assert torch.bincount(g, minlength=5).tolist() == [12] * 5
    flipped = g == DISTORTIONS.index("flip")
    assert torch.equal(x[flipped], torch.flip(y[flipped], [-1]))
    assert not torch.equal(x[~flipped], torch.flip(y[~flipped], [-1]))


def test_train_batches_depend_on_the_generator_state(images):
    task = make_task(TaskConfig(name="denoise"))
    index = torch.arange(60)
    gen = torch.Generator().manual_seed(3)
    first, _, _ = task.batch(images, index, gen)
    second, _, _ = task.batch(images, index, gen)  # the generator has moved on
    again, _, _ = task.batch(images, index, torch.Generator().manual_seed(3))
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_batch_without_generator_uses_the_default_rng(images):
    x, y, g = make_task(TaskConfig(name="denoise")).batch(images, torch.arange(60), None)
    assert x.shape == y.shape == images.shape and g.shape == (60,)


def test_eval_inputs_are_fixed_by_the_seed(images):
    task = make_task(TaskConfig(name="denoise"))
    a = task.eval_inputs(images, seed=11, chunk=16)
    b = task.eval_inputs(images, seed=11, chunk=16)
    c = task.eval_inputs(images, seed=12, chunk=16)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert torch.equal(a[2], torch.arange(60) % 5)
    assert a[0].shape == a[1].shape == images.shape
    # By definition: fixed-size chunks in order, one generator seeded once.
    gen = torch.Generator().manual_seed(11)
    first, _, _ = task.batch(images[:16], torch.arange(16), gen)
    second, _, _ = task.batch(images[16:32], torch.arange(16, 32), gen)
    assert torch.equal(a[0][:16], first) and torch.equal(a[0][16:32], second)


def test_eval_inputs_of_reconstruct_share_one_tensor(images):
    x, y, g = make_task(TaskConfig(name="reconstruct")).eval_inputs(images, seed=0)
    assert x is y and g is None and torch.equal(x, images.float() / 255)


# ---- colour --------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3))
def test_ycbcr_round_trip_on_photographs(index):
    photo = torch.from_numpy(photos()[index]).permute(2, 0, 1)[None]  # (1, 3, H, W)
    rgb = photo.float() / 255
    ycbcr = rgb_to_ycbcr(rgb)
    assert ycbcr.min() >= -1e-6 and ycbcr.max() <= 1 + 1e-6
    back = ycbcr_to_rgb(ycbcr)
    assert (back - rgb).abs().max() <= 1 / 255
    assert torch.equal((back * 255).round().to(torch.uint8), photo)


def test_ycbcr_matches_pil():
    photo = photos()[1]
    pil = np.asarray(Image.fromarray(photo).convert("YCbCr"), dtype=np.float32) / 255
    ours = rgb_to_ycbcr(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255)
    assert np.abs(ours[0].permute(1, 2, 0).numpy() - pil).max() <= 1.5 / 255


def test_colorize_batch_shapes_and_rgb_error():
    imgs = rgb_batch()  # (12, 3, 32, 32)
    task = make_task(TaskConfig(name="colorize"))
    y, cbcr, g = run(task, imgs)
    assert y.shape == (12, 1, 32, 32) and cbcr.shape == (12, 2, 32, 32) and g is None
    assert torch.allclose(task.to_rgb(y, cbcr), imgs.float() / 255, atol=1 / 255)
    exact = task.rgb_error(y, cbcr, cbcr)
    assert exact.shape == (12,) and exact.abs().max() < 1e-10
    grey = task.rgb_error(y, torch.full_like(cbcr, 0.5), cbcr)  # no colour at all
    assert (grey > 0).all()
    assert torch.allclose(grey, (task.to_rgb(y, torch.full_like(cbcr, 0.5))
                                 - task.to_rgb(y, cbcr)).square().flatten(1).mean(1))


def test_colorize_eval_inputs_and_grey_images_rejected():
    imgs = rgb_batch()
    task = make_task(TaskConfig(name="colorize"))
    y, cbcr, g = task.eval_inputs(imgs, seed=0, chunk=5)
    assert torch.equal(y, run(task, imgs)[0]) and g is None
    with pytest.raises(ValueError, match="RGB"):
        run(task, const(10, b=2))


def test_denoise_works_on_rgb_batches():
    imgs = rgb_batch()
    x, y, g = run(make_task(TaskConfig(name="denoise", patch_size=8)), imgs)
    assert x.shape == y.shape == imgs.shape and g.shape == (12,)
    assert x.min() >= 0 and x.max() <= 1

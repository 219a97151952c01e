"""Your own images as datasets: folders of image files and NumPy array files.

The folders and files are written here from the Fashion-MNIST sample shipped in the package
(real images): PNG and JPEG, grayscale and RGB, nested, of mixed sizes; broken files are
made by cutting or replacing real ones. Every bad input must end ``cae`` with one line and
exit status 2 before Ray starts; the decoded pixels are cached and the cache is reused until
a file changes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cae.cli import main
from cae.config.errors import UserError
from cae.config.trial import DataConfig, TrialConfig
from cae.data import datasets as cdata
from cae.data import imagefiles, userdata
from cae.data.datasets import load

SMALL_MODEL = {"channels": [4, 8], "dense": [16], "latent_dim": 4}


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Each test: its own data cache directory, nothing remembered from another test."""
    monkeypatch.setenv("CAE_DATA_DIR", str(tmp_path / "data-cache"))
    monkeypatch.setitem(userdata._REFRESH, "on", False)
    monkeypatch.setitem(userdata._REFRESH, "done", set())
    cdata.clear_cache()
    yield
    cdata.clear_cache()


def sample(n: int, offset: int = 0) -> np.ndarray:
    """``n`` real 28x28 grayscale images (uint8) of the embedded Fashion-MNIST sample."""
    return load(DataConfig(dataset="sample")).train[offset:offset + n, 0].numpy()


def coloured(gray: np.ndarray) -> np.ndarray:
    """A gray image (H, W) as an RGB image (H, W, 3) with real colour in it."""
    return np.stack([gray, 255 - gray, gray // 2], axis=-1)


def gray_folder(root: Path, n: int, offset: int = 0) -> Path:
    """``n`` grayscale 28x28 PNGs in two nested folders (class0/, class1/deeper/)."""
    for i, img in enumerate(sample(n, offset)):
        sub = root / ("class0" if i % 2 else "class1/deeper")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"img{i:04d}.png")
    return root


def mixed_folder(root: Path, n: int = 40) -> Path:
    """Grayscale 28x28 PNGs and RGB 40x32 JPEGs, nested, beside files that are not images."""
    for i, img in enumerate(sample(n)):
        sub = root / ("png" if i % 2 else "jpeg/nested")
        sub.mkdir(parents=True, exist_ok=True)
        if i % 2:
            Image.fromarray(img).save(sub / f"{i:03d}.png")
        else:
            Image.fromarray(coloured(img)).resize((40, 32)).save(sub / f"{i:03d}.jpg", quality=92)
    (root / "README.txt").write_text("not an image, not read")
    (root / ".hidden.png").write_bytes(b"hidden files are left out")
    return root


def write_spec(tmp_path: Path, data: dict, **trial) -> Path:
    spec = {"name": "mine", "trial": {"data": data, "model": SMALL_MODEL, "batch_size": 16,
                                      "max_epochs": 1, **trial},
            "scheduler": {"kind": "fifo"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def one_line_error(capsys) -> str:
    """The error ``cae`` printed: one line, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("cae: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ---- folders -------------------------------------------------------------------------------


def test_folder_reads_every_image_at_any_depth_into_uint8(tmp_path, capsys):
    root = mixed_folder(tmp_path / "imgs")
    cfg = DataConfig(dataset="folder", path=str(root), image_size=28)
    d = load(cfg)
    assert d.name == "folder:imgs"
    assert d.train.dtype == torch.uint8 and d.train.shape == (36, 3, 28, 28)  # colour in some
    assert d.test.shape == (4, 3, 28, 28)  # 10% held out
    got = userdata.read(userdata.want_of(cfg), userdata.data_root())
    assert sorted(got.paths) == sorted(str(p.relative_to(root)) for p in root.rglob("*.[pj]*g")
                                       if not p.name.startswith("."))
    assert got.paths != sorted(got.paths)  # kept in a shuffled order: fair limits
    assert torch.equal(d.test, torch.from_numpy(got.images[:4]))  # the held-out ones
    assert not got.grayscale
    info = cfg.info()
    assert (info.shape, info.train_size, info.test_size) == ((3, 28, 28), 36, 4)
    assert "decoded 40 images" in capsys.readouterr().out


def test_grayscale_folder_keeps_its_pixels_and_one_channel(tmp_path):
    root = gray_folder(tmp_path / "g", 30)
    cfg = DataConfig(dataset="folder", path=str(root))
    got = userdata.read(userdata.want_of(cfg), userdata.data_root())
    assert got.images.shape == (30, 1, 28, 28) and got.grayscale
    for row, rel in zip(got.images, got.paths):
        assert np.array_equal(row[0], np.asarray(Image.open(root / rel)))  # PNG: lossless
    first = list(got.paths)
    cdata.clear_cache()
    again = userdata.read(userdata.want_of(cfg), userdata.data_root())
    assert again.paths == first  # the same order every time (seeded)


def test_a_symbolic_link_back_to_a_parent_folder_is_left_out_once(tmp_path, capsys):
    """A link that loops back to a folder above it is not followed again (it would repeat
    the folder's images without end): one line names it, and every image is read once."""
    root = gray_folder(tmp_path / "g", 30)
    os.symlink("..", root / "class1" / "deeper" / "up")  # g/class1/deeper/up -> g/class1
    os.symlink("loop.png", root / "class0" / "loop.png")  # a link to itself
    spec = write_spec(tmp_path, {"dataset": "folder", "path": str(root)})
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    d = load(DataConfig(dataset="folder", path=str(root)))
    assert d.train.shape[0] + d.test.shape[0] == 30
    out = capsys.readouterr().out
    up = f"data: left out {root}/class1/deeper/up: a symbolic link back to a folder above it"
    assert out.count(up) == 1, out
    assert out.count(f"data: left out {root}/class0/loop.png: cannot be followed") == 1, out


def test_resize_and_crop_is_centred_and_keeps_the_aspect_ratio(tmp_path):
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255  # white in the centre square, black on both sides
    tall = np.zeros((40, 20), np.uint8)
    tall[10:30, :] = 255
    root = tmp_path / "shapes"
    root.mkdir()
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(tall).save(root / "tall.png")
    got = userdata.read(userdata.Want("folder", str(root), size=(10, 10), channels=1),
                        userdata.data_root())
    assert got.images.shape == (2, 1, 10, 10)
    # only the white centre survived the crop (the filter's support reaches one pixel
    # beyond it at the edges, as a resize of the whole picture would)
    assert got.images.min() >= 200 and (got.images[:, :, 2:-2, 2:-2] == 255).all()
    # [height, width]: the crop keeps the aspect ratio of the size asked for
    got = userdata.read(userdata.Want("folder", str(root), size=(10, 20), channels=1),
                        userdata.data_root())
    by_name = dict(zip(got.paths, got.images))
    assert by_name["wide.png"].shape == (1, 10, 20)
    assert np.array_equal(by_name["wide.png"][0, :, 10], np.full(10, 255))
    assert by_name["wide.png"][0, :, 0].max() < 10  # a wide picture is not cropped


def test_rgb_to_gray_as_pil_and_sixteen_bit_gray_scaled_not_clipped(tmp_path):
    root = tmp_path / "conv"
    root.mkdir()
    rgb = coloured(sample(1)[0])
    Image.fromarray(rgb).save(root / "a_rgb.png")
    ramp = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)
    Image.fromarray(ramp).save(root / "b_16bit.png")
    got = userdata.read(userdata.Want("folder", str(root), channels=1), userdata.data_root())
    by_name = dict(zip(got.paths, got.images))
    assert np.array_equal(by_name["a_rgb.png"][0], np.asarray(Image.fromarray(rgb).convert("L")))
    sixteen = by_name["b_16bit.png"][0].astype(int)
    assert sixteen.min() == 0 and sixteen.max() == 255
    assert abs(sixteen.ravel()[len(sixteen.ravel()) // 2] - 128) <= 1  # not clipped at 255


def test_test_path_is_the_test_split(tmp_path):
    train = gray_folder(tmp_path / "train", 30)
    test = gray_folder(tmp_path / "test", 12, offset=100)
    cfg = DataConfig(dataset="folder", path=str(train), test_path=str(test))
    d = load(cfg)
    assert d.train.shape[0] == 30 and d.test.shape[0] == 12
    assert sorted(d.test.flatten(1).sum(1).tolist()) == sorted(
        int(x.sum()) for x in sample(12, 100))
    info = cfg.info()
    assert (info.train_size, info.test_size) == (30, 12)
    limited = load(DataConfig(dataset="folder", path=str(train), test_path=str(test),
                              train_limit=10, test_limit=5))
    assert torch.equal(limited.train, d.train[:10]) and torch.equal(limited.test, d.test[:5])


def test_images_of_different_sizes_need_image_size(tmp_path):
    root = mixed_folder(tmp_path / "imgs")
    with pytest.raises(UserError, match=r"differ in size.*28x28.*40x32|40x32.*28x28"):
        DataConfig(dataset="folder", path=str(root)).info()


def test_non_square_images_are_refused_by_the_models(tmp_path):
    root = gray_folder(tmp_path / "g", 40)
    cfg = {"data": {"dataset": "folder", "path": str(root), "image_size": [16, 24]},
           "model": SMALL_MODEL, "batch_size": 8}
    with pytest.raises(ValueError, match="square"):
        TrialConfig.model_validate(cfg)


def test_parallel_decoding_equals_decoding_here(tmp_path, monkeypatch, capsys):
    if imagefiles.workers() < 2:
        pytest.skip("one core: nothing runs in parallel")
    root = gray_folder(tmp_path / "many", imagefiles.PARALLEL_FROM + 44)
    want = userdata.Want("folder", str(root), size=(20, 20), channels=3)
    parallel = userdata.read(want, tmp_path / "c1")
    assert f"on {imagefiles.workers()} core(s)" in capsys.readouterr().out
    cdata.clear_cache()
    monkeypatch.setattr(imagefiles, "workers", lambda: 1)
    here = userdata.read(want, tmp_path / "c2")
    assert "on 1 core(s)" in capsys.readouterr().out
    assert parallel.paths == here.paths and np.array_equal(parallel.images, here.images)


# ---- the cache -----------------------------------------------------------------------------


def test_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, capsys, monkeypatch):
    root = gray_folder(tmp_path / "g", 30)
    cfg = DataConfig(dataset="folder", path=str(root))
    first = load(cfg)
    assert "decoded 30 images" in capsys.readouterr().out
    cdata.clear_cache()  # a new process: only the cache on disk is left

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the images")

    with monkeypatch.context() as m:
        m.setattr(imagefiles, "decode_many", no_decoding)
        m.setattr(imagefiles, "headers", no_decoding)
        again = load(cfg)
        assert DataConfig(dataset="folder", path=str(root)).info().shape == (1, 28, 28)
    out = capsys.readouterr().out
    assert "30 images of" in out and "from the cache" in out
    assert torch.equal(first.train, again.train) and torch.equal(first.test, again.test)

    changed = min(root.rglob("*.png"))
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 10**18))  # a new modification time, whatever the clock
    cdata.clear_cache()
    got = userdata.read(userdata.want_of(cfg), userdata.data_root())
    assert "decoded 30 images" in capsys.readouterr().out
    row = got.paths.index(str(changed.relative_to(root)))
    assert (got.images[row] == 7).all()

    cdata.clear_cache()
    userdata.refresh_cache()  # --refresh-data
    load(cfg)
    assert "decoded 30 images" in capsys.readouterr().out


def test_dry_run_names_each_dataset_and_whether_it_is_cached(tmp_path, capsys):
    root = gray_folder(tmp_path / "g", 60)
    spec = write_spec(tmp_path, {"dataset": "folder", "path": str(root)})
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"folder:g: 54 images in {root} + 6 held out for testing (0.1), 1x28x28 uint8; "
            "cache: none yet") in out
    assert main(["data", "folder", "--path", str(root)]) == 0
    assert "decoded 60 images" in capsys.readouterr().out
    cdata.clear_cache()
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert "cache: used" in capsys.readouterr().out


def test_train_on_a_folder_without_ray(tmp_path, capsys):
    root = gray_folder(tmp_path / "g", 80)
    spec = tmp_path / "trial.yaml"
    spec.write_text(yaml.safe_dump({"data": {"dataset": "folder", "path": str(root)},
                                    "model": SMALL_MODEL, "batch_size": 16, "max_epochs": 1}))
    assert main(["train", str(spec), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "task reconstruct on folder" in out and "done: best val" in out


# ---- array files ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "nhwc-float", "npz-images",
                                    "npz-only"])
def test_array_files_in_every_layout(tmp_path, layout):
    gray = sample(50)
    rgb = np.stack([coloured(g) for g in gray])  # (N, H, W, 3)
    expect = rgb.transpose(0, 3, 1, 2)
    path = tmp_path / "a.npy"
    if layout == "nhw":
        np.save(path, gray)
        expect = gray[:, None]
    elif layout == "nhwc":
        np.save(path, rgb)
    elif layout == "nchw":
        np.save(path, expect)
    elif layout == "nhwc-float":
        np.save(path, rgb.astype(np.float32) / 255.0)
    elif layout == "npz-images":
        path = tmp_path / "a.npz"
        np.savez(path, labels=np.arange(50), images=rgb)
    else:
        path = tmp_path / "a.npz"
        np.savez_compressed(path, x=rgb)
    cfg = DataConfig(dataset="arrays", path=str(path), test_fraction=0.2)
    info = cfg.info()
    assert (info.shape, info.train_size, info.test_size) == (expect.shape[1:], 40, 10)
    d = load(cfg)
    both = torch.cat([d.test, d.train]).numpy()
    assert both.dtype == np.uint8 and both.shape == expect.shape
    order = np.random.default_rng(userdata.TEST_SEED).permutation(50)
    assert np.array_equal(both, expect[order])  # shuffled with the fixed seed, then split


def test_array_channels_and_size_are_converted(tmp_path):
    rgb = np.stack([coloured(g) for g in sample(20)])
    np.save(tmp_path / "a.npy", rgb)
    cfg = DataConfig(dataset="arrays", path=str(tmp_path / "a.npy"), channels=1, image_size=14)
    got = userdata.read(userdata.want_of(cfg), userdata.data_root())
    assert got.images.shape == (20, 1, 14, 14)
    pil = Image.fromarray(rgb[3]).convert("L").resize((14, 14), Image.Resampling.BICUBIC)
    assert np.abs(got.images[3, 0].astype(int) - np.asarray(pil).astype(int)).max() <= 1


# ---- bad input: one line, exit 2, before Ray starts ------------------------------------------


def _bad_arrays(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npy"
    array = {"rank": np.zeros((10, 28), np.uint8),
             "dtype": np.zeros((10, 28, 28), np.int64),
             "channels": np.zeros((10, 28, 28, 5), np.uint8),
             "ambiguous": np.zeros((10, 3, 8, 3), np.uint8)}[kind]
    np.save(path, array)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("empty", "holds no image files"),
    ("not_an_image", r"1 of the 31 image files under .* cannot be read: class0/broken.png "
                     r"\(not an image\).*skip_unreadable"),
    ("mixed_sizes", "differ in size"),
    ("colorize_gray", r"colorize' needs 3-channel images \(RGB\).*1 channel"),
    ("colorize_forced_rgb", "every image of .* is grayscale"),
    ("too_few", "27 after the validation split.*fewer than one batch"),
    ("arrays_rank", "10 x 28; images are N x H x W"),
    ("arrays_dtype", "int64 values; images are uint8"),
    ("arrays_channels", "neither its second nor its last axis is 1 or 3"),
    ("arrays_ambiguous", "set data.layout"),
    ("array_is_a_folder", "is not a .npy or .npz file"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, case, expected):
    data: dict = {"dataset": "folder"}
    trial: dict = {}
    if case == "missing":
        data["path"] = str(tmp_path / "nowhere")
    elif case == "empty":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        data["path"] = str(tmp_path / "empty")
    elif case == "not_an_image":
        root = gray_folder(tmp_path / "g", 30)
        (root / "class0" / "broken.png").write_text("this is text, not a PNG")
        data["path"] = str(root)
    elif case == "mixed_sizes":
        data["path"] = str(mixed_folder(tmp_path / "m"))
    elif case.startswith("colorize"):
        data["path"] = str(gray_folder(tmp_path / "g", 60))
        data.update({"channels": 3} if case == "colorize_forced_rgb" else {})
        trial["task"] = {"name": "colorize"}
    elif case == "too_few":
        data["path"] = str(gray_folder(tmp_path / "g", 33))  # 30 train, 27 after validation
        trial["batch_size"] = 32
    elif case.startswith("array"):
        data["dataset"] = "arrays"
        data["path"] = (str(tmp_path) if case == "array_is_a_folder"
                        else str(_bad_arrays(tmp_path, case.removeprefix("arrays_"))))
    spec = write_spec(tmp_path, data, **trial)
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    err = one_line_error(capsys)
    assert re.search(expected, err), err
    if case not in ("mixed_sizes", "too_few", "colorize_gray", "colorize_forced_rgb"):
        assert Path(data["path"]).name in err  # the file or folder is named


def test_unreadable_files_can_be_skipped_and_are_recorded(tmp_path, capsys):
    root = gray_folder(tmp_path / "g", 40)
    (root / "class0" / "broken.png").write_text("not a PNG")
    spec = write_spec(tmp_path, {"dataset": "folder", "path": str(root),
                                 "skip_unreadable": True})
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert "1 unreadable file(s) skipped" in capsys.readouterr().out
    d = load(DataConfig(dataset="folder", path=str(root), skip_unreadable=True))
    assert d.train.shape[0] + d.test.shape[0] == 40


def _truncated_folder(tmp_path: Path) -> Path:
    root = tmp_path / "t"
    root.mkdir()
    for i, img in enumerate(sample(40)):
        Image.fromarray(coloured(img)).save(root / f"{i:02d}.jpg", quality=90)
    whole = (root / "07.jpg").read_bytes()
    (root / "07.jpg").write_bytes(whole[: len(whole) // 2])  # its header still reads
    return root


@pytest.mark.parametrize("what", ["truncated", "out_of_range", "nan"])
def test_what_only_decoding_finds_stops_the_sweep_before_ray(tmp_path, capsys, what):
    """A truncated JPEG reads as an image from its header, a float array's values are only
    seen when read: both are found when the driver loads the data, before Ray starts."""
    import ray

    if what == "truncated":
        data = {"dataset": "folder", "path": str(_truncated_folder(tmp_path)),
                "image_size": 28, "channels": 3}
        expected, named = "1 of the 40 image files", "07.jpg"
    else:
        images = sample(40).astype(np.float32) / 255.0
        images[17, 3, 3] = 1.5 if what == "out_of_range" else np.nan
        np.save(tmp_path / "x.npy", images)
        data = {"dataset": "arrays", "path": str(tmp_path / "x.npy")}
        expected, named = "float images must lie in [0, 1]", "x.npy"
    spec = write_spec(tmp_path, data)
    runs = tmp_path / "runs"
    assert main(["sweep", str(spec), "--storage", str(runs)]) == 2
    err = one_line_error(capsys)
    assert expected in err and named in err
    assert not runs.exists() and not ray.is_initialized()


# ---- the facts recorded for trials on other nodes ------------------------------------------


def test_a_trial_validates_from_the_recorded_facts_without_the_files(tmp_path, monkeypatch):
    """On a cluster only the driver has the files: trials (and cae status, cae report)
    validate their configs from the facts the sweep recorded in its spec."""
    import shutil

    from cae.config.spec import SweepSpec
    from cae.model.memory import estimate
    from cae.sweep.plan import check_spec, record_data_facts

    root = gray_folder(tmp_path / "g", 50)
    (root / "class0" / "broken.png").write_text("not a PNG")
    monkeypatch.chdir(tmp_path)  # a relative path in the spec becomes absolute in the record
    spec = SweepSpec.model_validate({
        "trial": {"data": {"dataset": "folder", "path": "g", "skip_unreadable": True},
                  "model": SMALL_MODEL, "batch_size": 8},
        "space": {"data.image_size": {"grid": [16, 28]}}})
    checked = check_spec(spec)
    for cfg in checked.datasets.values():
        load(cfg)
    assert not record_data_facts(spec, checked)  # the headers had said what loading found
    facts = spec.trial["data"]["facts"]
    assert spec.trial["data"]["path"] == str(root)
    assert [f["image_size"] for f in facts] == [16, 28]
    assert all(f["skipped"] == ["class0/broken.png"] and f["images"] == 50 for f in facts)
    text = yaml.safe_dump(spec.model_dump(mode="json"))
    shutil.rmtree(root)
    cdata.clear_cache()
    again = SweepSpec.model_validate(yaml.safe_load(text))
    checked = check_spec(again)  # no file is read
    cfg = TrialConfig.model_validate({**again.trial, "data": {**again.trial["data"],
                                                              "image_size": 16}})
    assert (cfg.model.in_channels, cfg.model.image_size) == (1, 16)
    assert estimate(cfg).data > 0
    assert json.loads(next(iter(checked.datasets)))[0] == "folder"
    with pytest.raises(UserError, match="does not exist"):
        load(cfg.data)  # the pixels themselves need the files


@pytest.mark.parametrize("given, checks, refused", [
    ({}, 1, None),  # the headers say what loading finds
    ({"image_size": 28, "channels": 1}, 2, None),  # no header read: the skipped file is news
    ({"image_size": 28, "channels": 3, "task": "colorize"}, 2, "needs images in colour"),
])
def test_a_sweep_validates_its_grid_once(tmp_path, monkeypatch, given, checks, refused):
    """``cae sweep`` records the data directory before it checks the grid, and checks it
    again after loading the images only when they differ from what the check read of them
    (then the exact facts can refuse what the headers could not)."""
    from cae.config.spec import SweepSpec
    from cae.sweep import driver, plan

    root = gray_folder(tmp_path / "g", 50)
    (root / "class0" / "broken.png").write_text("not a PNG")
    calls = []
    check = plan.check_spec
    monkeypatch.setattr(plan, "check_spec", lambda *a, **k: calls.append(1) or check(*a, **k))
    monkeypatch.setattr(driver, "_drive", lambda *a, **k: 0)  # no Ray: what comes before it
    data = {"dataset": "folder", "path": str(root), "skip_unreadable": True,
            **{k: v for k, v in given.items() if k != "task"}}
    trial = {"data": data, "model": SMALL_MODEL, "batch_size": 8,
             "task": {"name": given.get("task", "reconstruct")}}
    spec = SweepSpec.model_validate({"trial": trial, "storage": str(tmp_path / "runs"),
                                     "space": {"lr": {"grid": [0.001, 0.01]}}})
    if refused:
        with pytest.raises(UserError, match=refused):
            driver.new_sweep(spec, "r")
    else:
        assert driver.new_sweep(spec, "r") == 0
        recorded = spec.trial["data"]
        assert recorded["data_dir"] == str(Path(os.environ["CAE_DATA_DIR"]).resolve())
        assert [f["images"] for f in recorded["facts"]] == [50]
    assert len(calls) == checks


def test_the_data_dir_is_recorded_for_every_dataset_but_the_sample(tmp_path):
    from cae.config.spec import SweepSpec
    from cae.sweep.plan import dataset_names, record_data_dir

    def spec(trial: dict, space: dict | None = None) -> SweepSpec:
        return SweepSpec.model_validate({"trial": trial, "space": space or {}})

    assert dataset_names(spec({})) == {"sample"}
    mixed = spec({"data": {"dataset": "sample"}},
                 {"lr": {"grid": [0.1, 0.2]}, "variant": {"grid": [
                     {"data.dataset": "mnist"}, {"task.name": "denoise"}]}})
    assert dataset_names(mixed) == {"sample", "mnist"}
    overridden = spec({"data": {"dataset": "mnist"}}, {"data.dataset": {"grid": ["sample"]}})
    assert dataset_names(overridden) == {"sample"}
    alone = spec({})
    assert not record_data_dir(alone, None) and "data" not in alone.trial
    assert record_data_dir(alone, str(tmp_path / "d"))
    assert alone.trial["data"]["data_dir"] == str((tmp_path / "d").resolve())
    assert record_data_dir(mixed, None) and mixed.trial["data"]["data_dir"]
    assert not record_data_dir(spec({"data": "not a mapping"}), None)  # the check says why


def test_relative_paths_in_the_space_are_recorded_absolute(tmp_path, monkeypatch):
    """Trials resolve their config on other nodes, in other folders: every data path the
    spec sets (base, grid, choice, variant) is written down absolute before they start."""
    from cae.config.spec import SweepSpec
    from cae.sweep.plan import _absolute_data_paths

    monkeypatch.chdir(tmp_path)
    spec = SweepSpec.model_validate({
        "trial": {"data": {"dataset": "folder", "path": "a", "test_path": "~/t"}},
        "space": {"data.path": {"grid": ["a", "b/c"]}, "data.test_path": "t2",
                  "variant": {"grid": [{"data.path": "d", "lr": 0.1}, {"lr": 0.2}]},
                  "variant2": {"data.path": "e"}}})
    _absolute_data_paths(spec)
    home = os.path.expanduser("~")
    assert spec.trial["data"] == {"dataset": "folder", "path": str(tmp_path / "a"),
                                  "test_path": f"{home}/t"}
    assert spec.space["data.path"] == {"grid": [str(tmp_path / "a"), str(tmp_path / "b/c")]}
    assert spec.space["data.test_path"] == str(tmp_path / "t2")
    assert spec.space["variant"]["grid"] == [{"data.path": str(tmp_path / "d"), "lr": 0.1},
                                             {"lr": 0.2}]
    assert spec.space["variant2"] == {"data.path": str(tmp_path / "e")}


# ---- end to end (Ray) ----------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_over_folders_end_to_end_with_pictures(tmp_path, capsys):
    """A grid over two folders (one with an unreadable file, skipped), then resume and
    report: the spec records what was read, the report draws pictures and says what was
    skipped, the reference errors cover both folders."""
    gray = gray_folder(tmp_path / "gray", 240)
    (gray / "class0" / "broken.png").write_text("not a PNG")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i, img in enumerate(sample(240, 300)):
        Image.fromarray(coloured(img)).resize((36, 30)).save(rgb / f"{i:03d}.jpg", quality=90)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "folders",
        "trial": {"data": {"dataset": "folder", "path": str(gray), "image_size": 24,
                           "skip_unreadable": True},
                  "model": SMALL_MODEL, "batch_size": 32, "max_epochs": 2},
        "space": {"data.path": {"grid": [str(gray), str(rgb)]},
                  "model.latent_dim": {"grid": [4, 8]}},
        "scheduler": {"kind": "fifo"}}))
    runs = tmp_path / "runs"
    assert main(["sweep", str(spec), "--storage", str(runs), "--name", "r"]) == 0
    run = runs / "r"
    saved = yaml.safe_load((run / "spec.yaml").read_text())
    facts = {f["path"]: f for f in saved["trial"]["data"]["facts"]}
    assert facts[str(gray)]["skipped"] == ["class0/broken.png"]
    assert facts[str(gray)]["shape"] == [1, 24, 24] and facts[str(rgb)]["shape"] == [3, 24, 24]
    import pandas as pd

    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 4 and (trials["status"] == "TERMINATED").all()
    assert set(trials["data.path"]) == {str(gray), str(rgb)}
    base = pd.read_parquet(run / "baselines.parquet")
    assert {"folder:gray", "folder:rgb"} <= set(base["dataset"])
    page = (run / "report.html").read_text()
    assert page.count("base64,") >= 9 and "no pictures" not in page
    assert "1 unreadable file(s) skipped under" in page and "class0/broken.png" in page
    capsys.readouterr()
    assert main(["resume", str(run), "--no-report"]) == 0  # finished: loads, runs nothing
    assert main(["report", str(run), "--refresh-data"]) == 0
    assert "decoded 240 images" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_on_array_files_for_every_task(tmp_path):
    """Arrays (NHWC floats, NCHW uint8 with a test file) under reconstruct, denoise and
    colorize, in one sweep of variants."""
    gray = sample(300)
    np.save(tmp_path / "gray.npy", gray.astype(np.float32)[..., None] / 255.0)  # NHWC
    rgb = np.stack([coloured(g) for g in sample(300, 300)]).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "rgb.npz", images=rgb[:250])
    np.save(tmp_path / "rgb_test.npy", rgb[250:])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "arrays",
        "trial": {"data": {"dataset": "arrays", "path": str(tmp_path / "gray.npy")},
                  "model": SMALL_MODEL, "batch_size": 32, "max_epochs": 2},
        "space": {"variant": {"grid": [
            {"task.name": "reconstruct"},
            {"task.name": "denoise"},
            {"task.name": "colorize", "data.path": str(tmp_path / "rgb.npz"),
             "data.test_path": str(tmp_path / "rgb_test.npy"), "data.layout": "nchw"}]}},
        "scheduler": {"kind": "fifo"}}))
    runs = tmp_path / "runs"
    assert main(["sweep", str(spec), "--storage", str(runs), "--name", "r"]) == 0
    import pandas as pd

    trials = pd.read_parquet(runs / "r" / "trials.parquet")
    assert sorted(trials["task.name"]) == ["colorize", "denoise", "reconstruct"]
    assert (trials["status"] == "TERMINATED").all() and trials["test_loss"].notna().all()
    colour = trials[trials["task.name"] == "colorize"].iloc[0]
    assert colour["data_loaded"] == "arrays:rgb.npz: (250, 3, 28, 28) train images"
    page = (runs / "r" / "report.html").read_text()
    assert page.count("base64,") >= 9 and "no pictures" not in page

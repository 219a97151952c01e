"""Your own images as a dataset: every image under a folder, or the images of an array file.

``data: {dataset: folder, path: DIR}`` reads every PNG, JPEG, BMP, TIFF and WebP file under
DIR at any depth (sorted paths; hidden files left out; symbolic links followed, except one
back to a folder above it, which is named and left out), converts each to ``channels`` (1:
grayscale, 3: RGB; default 1 when every image is grayscale, else 3) and to ``image_size``
(a centred resize-and-crop that keeps the aspect ratio; needed when the images differ in
size), and keeps them as uint8 ``(N, C, H, W)`` like every other dataset.
``data: {dataset: arrays, path: FILE}`` reads a ``.npy`` or ``.npz`` file (its ``images``
array, or its only one): uint8 in [0, 255] or floats in [0, 1], laid out as
``cae.data.imagefiles.array_layout`` says.

Only the driver of a sweep reads these files. What a model must know of them (their shape,
how many there are) is found cheaply first by :func:`probe` (the cache's record, else the
image or array headers, never the pixels) and recorded in the run's spec
(``DataConfig.facts``), so a trial validates its config on any node without the files, and
so do ``cae status`` and ``cae report`` later. Decoding a folder is paid once
(``cae.data.imagefolder``): the decoded arrays are cached in the data directory (``decoded/``,
keyed by every file's path, size and modification time and by the settings), and the
first decode runs on every core (``cae.data.imagefiles``, which reads single files).

The test split is ``test_path`` (another folder or file), else ``test_fraction`` of the
images held out before the validation split. A folder's images are kept in an order
shuffled with the fixed seed :data:`TEST_SEED` (an array file's are shuffled the same way
when loaded), so the held-out test images, and the first N that ``train_limit`` /
``test_limit`` keep, are fair samples even of a folder sorted by class.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cae.config.catalog import DatasetInfo
from cae.data import imagefiles, imagefolder
from cae.data.imagefiles import DataError
from cae.data.imagefolder import DECODE_VERSION, TEST_SEED, Images, say

if TYPE_CHECKING:
    from cae.config.trial import DataConfig

__all__ = ["TEST_SEED", "DataError", "Images", "Want", "data_root", "dataset_info", "describe",
           "facts", "forget", "held_out", "load", "loaded_facts", "probe", "read", "refresh_cache",
           "skipped_note", "want_of"]


def data_root(data_dir: str | None = None) -> Path:
    """Where datasets live: ``data_dir``, else ``$CAE_DATA_DIR``, else the user cache dir."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("CAE_DATA_DIR"):
        return Path(os.environ["CAE_DATA_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cae-sweep")) / "data"


# ---- what is asked for ----------------------------------------------------------------


@dataclass(frozen=True)
class Want:
    """The settings that decide a user dataset's pixels (not how it is split)."""

    kind: str  # "folder" or "arrays"
    path: str
    test_path: str | None = None
    size: tuple[int, int] | None = None  # (height, width)
    channels: int | None = None
    layout: str = "auto"
    skip_unreadable: bool = False


def hw(image_size: int | list[int] | tuple[int, ...] | None) -> tuple[int, int] | None:
    """``image_size`` as (height, width): one number is a square."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


def want_of(cfg: DataConfig) -> Want:
    return Want(cfg.dataset, cfg.path, cfg.test_path, hw(cfg.image_size), cfg.channels,
                cfg.layout, cfg.skip_unreadable)


def settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings recorded beside a dataset's facts, to find them again."""
    return {"dataset": cfg.dataset, "path": cfg.path, "test_path": cfg.test_path,
            "image_size": cfg.image_size, "channels": cfg.channels, "layout": cfg.layout,
            "skip_unreadable": cfg.skip_unreadable}


def held_out(n: int, fraction: float) -> int:
    """Images of ``n`` held out at ``fraction`` (at least one, never all): a user dataset's
    test images without a ``test_path``, and every dataset's validation images."""
    return min(max(1, round(n * fraction)), n - 1)


# ---- facts: what the model needs to know, without the pixels --------------------------

_PROBED: dict[str, dict] = {}  # in-process: repr((want, data root)) -> facts


def recorded(cfg: DataConfig) -> dict | None:
    """The facts recorded for ``cfg``'s settings in ``cfg.facts`` (from the run's spec)."""
    mine = settings(cfg)
    for entry in cfg.facts:
        facts = entry.model_dump(mode="json")
        if all(facts.get(k) == v for k, v in mine.items()):
            return facts
    return None


def facts(cfg: DataConfig, refresh: bool = False) -> dict:
    """Shape, image counts, grayscale, skipped files and whether the cache holds the decoded
    images: recorded in the config, else found in the files (once per process)."""
    found = recorded(cfg)
    if found is not None:
        return found
    want = want_of(cfg)
    key = repr((want, str(data_root(cfg.data_dir))))
    if refresh or key not in _PROBED:
        again = refresh or _REFRESH["on"]
        _PROBED[key] = {**settings(cfg), **probe(want, data_root(cfg.data_dir), again)}
    return _PROBED[key]


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """The shape and split sizes of a user dataset, as for a registry entry (sizes before
    ``train_limit`` / ``test_limit``, as the registry's)."""
    f = facts(cfg)
    n, n_test = f["images"], f["test_images"]
    if n_test is None:
        n_test = held_out(n, cfg.test_fraction)
        n -= n_test
    return DatasetInfo(cfg.label(), tuple(f["shape"]), n, n_test)


def describe(cfg: DataConfig) -> str:
    """One line for the dry run: where the images come from, how many, their shape, and
    whether the decoded images are cached."""
    f = facts(cfg)
    info = dataset_info(cfg)
    shape = "x".join(map(str, info.shape))
    split = (f"{info.test_size:,} more in {cfg.test_path} for testing" if cfg.test_path
             else f"{info.test_size:,} held out for testing ({cfg.test_fraction:g})")
    what = "images" if cfg.dataset == "folder" else "array images"
    line = f"{cfg.label()}: {info.train_size:,} {what} in {cfg.path} + {split}, {shape} uint8"
    if cfg.dataset == "folder":
        line += ("; cache: used (decoded before)" if f.get("cached")
                 else "; cache: none yet (the first load decodes the files on every core)")
    skipped = len(f["skipped"]) + len(f["test_skipped"])
    if skipped:
        line += f"; {skipped} unreadable file(s) skipped"
    return line


def skipped_note(data: dict) -> str:
    """What a run's spec (its ``trial.data`` mapping) says was skipped, for the report."""
    parts = []
    for entry in data.get("facts") or []:
        names = list(entry.get("skipped") or []) + list(entry.get("test_skipped") or [])
        if names:
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20
                                            else "")
            parts.append(f"{len(names)} unreadable file(s) skipped under {entry['path']}: "
                         f"{shown}")
    return "; ".join(parts)


def probe(want: Want, cache_root: Path, refresh: bool = False) -> dict:
    """Facts of ``want`` from its headers or the cache's record (see the module doc)."""
    if want.kind == "arrays":
        return _probe_arrays(want)
    main, test = _listings(want)
    key = imagefolder.key_of(want, main, test)
    return imagefolder.probe(want, main, test, key, cache_root, refresh)


def _listings(want: Want) -> tuple[imagefolder.Listing, imagefolder.Listing | None]:
    main = imagefolder.listing(want.path, "data.path")
    return main, (imagefolder.listing(want.test_path, "data.test_path") if want.test_path
                  else None)


# ---- loading ----------------------------------------------------------------------------


_LOADED: dict[str, Images] = {}  # in-process: cache key -> images (read-only)
_REFRESH = {"on": False, "done": set()}


def refresh_cache() -> None:
    """From now on in this process, the first load of each user dataset decodes its files
    again and rewrites the cache (``--refresh-data``)."""
    _REFRESH["on"] = True
    _REFRESH["done"] = set()


def forget() -> None:
    """Forget what this process found and loaded (``cae.data.datasets.clear_cache``)."""
    _PROBED.clear()
    _LOADED.clear()
    imagefolder.forget()


def read(want: Want, cache_root: Path) -> Images:
    """The images of ``want``: from this process's memory, the cache, or the files."""
    if want.kind == "arrays":
        key = _arrays_key(want)
        if key not in _LOADED:
            _LOADED[key] = _read_arrays(want, key)
        return _LOADED[key]
    main, test = _listings(want)
    key = imagefolder.key_of(want, main, test)
    refresh = _REFRESH["on"] and key not in _REFRESH["done"]
    if not refresh and key in _LOADED:
        return _LOADED[key]
    hit = None if refresh else imagefolder.read_cache(cache_root, want, main, test, key)
    if hit is None:
        hit = imagefolder.decode(want, main, test, key)
        imagefolder.write_cache(cache_root, want, hit)
        _REFRESH["done"].add(key)
        _PROBED.clear()  # what was probed before says "not cached"
    _LOADED[key] = hit
    return hit


def load(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, Images]:
    """``cfg``'s train and test images, uint8 ``(N, C, H, W)`` (views of the read images
    where possible: no copy), before ``train_limit`` / ``test_limit``."""
    got = read(want_of(cfg), data_root(cfg.data_dir))
    _check_recorded(cfg, got)
    images = got.images
    if cfg.dataset == "arrays":  # a folder's images are kept shuffled already
        images = _shuffled(images)
    if got.test is not None:
        return images, (got.test if cfg.dataset == "folder" else _shuffled(got.test)), got
    n_test = held_out(len(images), cfg.test_fraction)
    return images[n_test:], images[:n_test], got


def _shuffled(a: np.ndarray) -> np.ndarray:
    return a[np.random.default_rng(TEST_SEED).permutation(len(a))]


def _check_recorded(cfg: DataConfig, got: Images) -> None:
    """A run's recorded facts say what its trials trained on: say so when the files have
    changed since (the images read now are not those)."""
    was = recorded(cfg)
    if was is not None and was.get("fingerprint") and was["fingerprint"] != got.key:
        say(f"data: warning: the files of {cfg.label()} ({cfg.path}) have changed since the "
            "run recorded them; the images read now are not the ones it trained on")


def loaded_facts(cfg: DataConfig) -> dict:
    """The exact facts of ``cfg``'s images as loaded (read again only if not in memory)."""
    return facts_of(cfg, read(want_of(cfg), data_root(cfg.data_dir)))


def facts_of(cfg: DataConfig, got: Images) -> dict:
    """The exact facts of loaded images, to record in a run's spec."""
    return {**settings(cfg), **got.summary(), "fingerprint": got.key}


# ---- array files ------------------------------------------------------------------------



def _array_shape(want: Want, path: str, where: str) -> tuple[int, int, int, int, str]:
    """(N, C, H, W) of the images in an array file as stored, and their layout."""
    shape, dtype = imagefiles.array_header(path, where)
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise DataError(f"{where}: {path} holds {dtype} values; images are uint8 in [0, 255] "
                        "or floats in [0, 1]")
    layout = imagefiles.array_layout(tuple(shape), want.layout, f"{where} {path}")
    n, *rest = shape
    if layout == "nhw":
        c, h, w = 1, *rest
    elif layout == "nhwc":
        h, w, c = rest
    else:
        c, h, w = rest
    if c not in (1, 3):
        raise DataError(f"{where}: {path} has {c} channels ({layout}); images have 1 "
                        "(grayscale) or 3 (RGB)")
    if n < 1 or h < 1 or w < 1:
        raise DataError(f"{where}: {path} holds no images ({imagefiles.dims(tuple(shape))})")
    return n, c, h, w, layout


def _array_target(want: Want, heads: list[tuple]) -> tuple[int, int, int]:
    """(C, H, W) every image becomes: ``channels`` or 1 if all are grayscale, else 3;
    ``image_size`` or the common size."""
    c = want.channels or (1 if all(h[1] == 1 for h in heads) else 3)
    if want.size is not None:
        return c, *want.size
    sizes = {(h[2], h[3]) for h in heads}
    if len(sizes) > 1:
        raise DataError(f"data.image_size: the images of {want.path} and {want.test_path} "
                        f"differ in size ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}); "
                        "set data.image_size")
    return c, *sizes.pop()


def _array_key(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _heads(want: Want) -> list[tuple[int, int, int, int, str]]:
    """:func:`_array_shape` of the array file and of its test file, if any."""
    heads = [_array_shape(want, want.path, "data.path")]
    if want.test_path:
        heads.append(_array_shape(want, want.test_path, "data.test_path"))
    return heads


def _probe_arrays(want: Want) -> dict:
    heads = _heads(want)
    c, h, w = _array_target(want, heads)
    return {"shape": [c, h, w], "images": heads[0][0],
            "test_images": heads[1][0] if want.test_path else None,
            "grayscale": all(hd[1] == 1 for hd in heads), "skipped": [], "test_skipped": [],
            "cached": False, "fingerprint": _arrays_key(want)}


def _arrays_key(want: Want) -> str:
    parts = [_array_key(want.path)] + ([_array_key(want.test_path)] if want.test_path else [])
    text = json.dumps([DECODE_VERSION, parts, want.size, want.channels, want.layout])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_arrays(want: Want, key: str) -> Images:
    """The images of an array file (and its test file) as ``want`` asks; ``key`` is
    :func:`_arrays_key` of ``want``."""
    heads = _heads(want)
    target = _array_target(want, heads)
    out = [imagefiles.convert_array(imagefiles.open_array(p, where), hd[4], target, f"{where}: {p}")
           for p, where, hd in zip((want.path, want.test_path), ("data.path", "data.test_path"),
                                   heads)]
    return Images(out[0], out[1] if len(out) > 1 else None,
                  grayscale=all(hd[1] == 1 for hd in heads), key=key)

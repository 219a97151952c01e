"""Your own images as a dataset: every image under a folder, or the images of an array file.

``data: {dataset: folder, path: DIR}`` reads every PNG, JPEG, BMP, TIFF and WebP file under
DIR at any depth (sorted paths; hidden files left out), converts each to ``channels`` (1:
grayscale, 3: RGB; default 1 when every image is grayscale, else 3) and to ``image_size``
(a centred resize-and-crop that keeps the aspect ratio; needed when the images differ in
size), and keeps them as uint8 ``(N, C, H, W)`` like every other dataset.
``data: {dataset: arrays, path: FILE}`` reads a ``.npy`` or ``.npz`` file (its ``images``
array, or its only one): uint8 in [0, 255] or floats in [0, 1], laid out as
:func:`array_layout` says.

Only the driver of a sweep reads these files. What a model must know of them (their shape,
how many there are) is found cheaply first by :func:`probe` (the cache's record, else the
image or array headers, never the pixels) and recorded in the run's spec
(``DataConfig.facts``), so a trial validates its config on any node without the files, and
so do ``cae status`` and ``cae report`` later. Decoding a folder is paid once: the decoded
arrays are cached in the data directory (``decoded/``, keyed by every file's path, size and
modification time and by the settings), and the first decode runs on every core.

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
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cae import imagefiles
from cae.catalog import DatasetInfo
from cae.imagefiles import DataError

if TYPE_CHECKING:
    from cae.config import DataConfig

TEST_SEED = 1729  # the order of a dataset's images: which are held out for testing
DECODE_VERSION = 1  # part of every cache key: bump when decoding changes
MAX_NAMED = 5  # unreadable files named in a message
__all__ = ["DataError", "Images", "Want", "data_root", "dataset_info", "describe", "facts",
           "load", "probe", "read", "refresh_cache"]


def data_root(data_dir: str | None = None) -> Path:
    """Where datasets live: ``data_dir``, else ``$CAE_DATA_DIR``, else the user cache dir."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("CAE_DATA_DIR"):
        return Path(os.environ["CAE_DATA_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cae-sweep")) / "data"


def say(line: str) -> None:
    """One line about what the data loading did (decoded, or read from the cache)."""
    print(line, flush=True)


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
    """Images of ``n`` held out for testing at ``fraction`` (at least one, never all)."""
    return min(max(1, round(n * fraction)), n - 1)


# ---- facts: what the model needs to know, without the pixels --------------------------

_PROBED: dict[str, dict] = {}  # in-process: Want -> facts


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
    main = _scan_checked(want.path, "data.path")
    test = _scan_checked(want.test_path, "data.test_path") if want.test_path else None
    key = _folder_key(want, main, test)
    meta = None if refresh else _read_meta(cache_root, want, key)
    if meta is not None:
        return {k: meta[k] for k in ("shape", "images", "test_images", "grayscale", "skipped",
                                     "test_skipped")} | {"cached": True, "fingerprint": key}
    if want.size is not None and want.channels is not None:  # nothing to look at yet
        shape, gray, bad = [want.channels, *want.size], None, {}
    else:
        heads = _headers_of(want, main, test, key)
        shape, gray = _resolve(want, heads, main, test)
        bad = {i: h for i, h in enumerate(heads) if isinstance(h, str)}
        _refuse_unreadable(want, bad, main, test)
    n_main = len(main) - sum(1 for i in bad if i < len(main))
    n_test = None if test is None else len(test) - (len(bad) - (len(main) - n_main))
    names = _names(main, test)
    return {"shape": list(shape), "images": n_main, "test_images": n_test, "grayscale": gray,
            "skipped": [names[i] for i in bad if i < len(main)],
            "test_skipped": [names[i] for i in bad if i >= len(main)],
            "cached": False, "fingerprint": key}


# ---- loading ----------------------------------------------------------------------------


@dataclass
class Images:
    """A user dataset as read: its images in their kept order, and (folders) their paths."""

    images: np.ndarray  # (N, C, H, W) uint8
    test: np.ndarray | None  # from test_path
    paths: list[str] | None = None  # relative to the folder, one per image
    test_paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)
    test_skipped: list[str] = field(default_factory=list)
    grayscale: bool = False
    key: str = ""
    cached: bool = False


_LOADED: dict[str, Images] = {}  # in-process: cache key -> images (read-only)
_REFRESH = {"on": False, "done": set()}


def refresh_cache() -> None:
    """From now on in this process, the first load of each user dataset decodes its files
    again and rewrites the cache (``--refresh-data``)."""
    _REFRESH["on"] = True
    _REFRESH["done"] = set()


def forget() -> None:
    """Forget what this process found and loaded (``cae.data.clear_cache``)."""
    _PROBED.clear()
    _LOADED.clear()
    _HEADERS.clear()


def read(want: Want, cache_root: Path) -> Images:
    """The images of ``want``: from this process's memory, the cache, or the files."""
    if want.kind == "arrays":
        key = _arrays_key(want)
        if key not in _LOADED:
            _LOADED[key] = _read_arrays(want)
        return _LOADED[key]
    main = _scan_checked(want.path, "data.path")
    test = _scan_checked(want.test_path, "data.test_path") if want.test_path else None
    key = _folder_key(want, main, test)
    refresh = _REFRESH["on"] and key not in _REFRESH["done"]
    if not refresh and key in _LOADED:
        return _LOADED[key]
    hit = None if refresh else _read_cache(cache_root, want, key)
    if hit is None:
        hit = _decode_folder(want, main, test, key)
        _write_cache(cache_root, want, hit)
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
        images = images[np.random.default_rng(TEST_SEED).permutation(len(images))]
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
    return {**settings(cfg), "shape": list(got.images.shape[1:]), "images": len(got.images),
            "test_images": None if got.test is None else len(got.test),
            "grayscale": got.grayscale, "skipped": got.skipped,
            "test_skipped": got.test_skipped, "fingerprint": got.key}


# ---- folders: listing, keys, the cache ---------------------------------------------------


def _scan_checked(path: str, where: str) -> list[tuple[str, int, int]]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{where}: {path} does not exist")
    if not p.is_dir():
        raise DataError(f"{where}: {path} is a file, and dataset 'folder' reads a folder of "
                        "images (for a .npy or .npz file use dataset: arrays)")
    files = scan(p)
    if not files:
        kinds = ", ".join(s.lstrip(".").upper() for s in imagefiles.IMAGE_SUFFIXES)
        raise DataError(f"{where}: {path} holds no image files ({kinds}) at any depth")
    return files


def scan(root: Path) -> list[tuple[str, int, int]]:
    """Every image file under ``root``: (path relative to root, size, mtime in ns), sorted
    by path; hidden files and folders are left out."""
    out, stack = [], [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise DataError(f"{folder}: cannot be listed ({exc.strerror})") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                stack.append((e.path, f"{rel}{e.name}/"))
            elif e.name.lower().endswith(imagefiles.IMAGE_SUFFIXES) and e.is_file():
                st = e.stat()
                out.append((rel + e.name, st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def _folder_key(want: Want, main: list, test: list | None) -> str:
    """Changes whenever a file is added, removed, resized or touched, or a setting changes."""
    text = json.dumps([DECODE_VERSION, want.path, want.test_path, want.size, want.channels,
                       want.skip_unreadable, main, test])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _slot(cache_root: Path, want: Want) -> Path:
    """One cache entry per folder and settings: a new decode replaces the old one."""
    text = json.dumps([want.path, want.test_path, want.size, want.channels,
                       want.skip_unreadable])
    return cache_root / "decoded" / hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_meta(cache_root: Path, want: Want, key: str) -> dict | None:
    try:
        meta = json.loads(_slot(cache_root, want).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("key") == key else None


def _read_cache(cache_root: Path, want: Want, key: str) -> Images | None:
    meta = _read_meta(cache_root, want, key)
    if meta is None:
        return None
    slot = _slot(cache_root, want)
    try:
        images = np.load(slot.with_suffix(".npy"))
        test = np.load(slot.with_suffix(".test.npy")) if want.test_path else None
    except (OSError, ValueError):
        return None
    if list(images.shape) != [meta["images"], *meta["shape"]]:
        return None
    say(f"data: {len(images) + (0 if test is None else len(test)):,} images of {want.path} "
        f"from the cache (decoded {meta['created']}; --refresh-data decodes them again)")
    return Images(images, test, meta["paths"], meta["test_paths"], meta["skipped"],
                  meta["test_skipped"], meta["grayscale"], key, cached=True)


def _write_cache(cache_root: Path, want: Want, got: Images) -> None:
    slot = _slot(cache_root, want)
    meta = {"key": got.key, "path": want.path, "test_path": want.test_path,
            "shape": list(got.images.shape[1:]), "images": len(got.images),
            "test_images": None if got.test is None else len(got.test),
            "grayscale": got.grayscale, "skipped": got.skipped,
            "test_skipped": got.test_skipped, "paths": got.paths, "test_paths": got.test_paths,
            "created": time.strftime("%Y-%m-%d %H:%M")}
    try:
        slot.parent.mkdir(parents=True, exist_ok=True)
        for suffix, array in ((".npy", got.images), (".test.npy", got.test)):
            if array is not None:
                _write_whole(slot.with_suffix(suffix), lambda f, a=array: np.save(f, a))
        _write_whole(slot.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
    except OSError as exc:
        say(f"data: the decoded images could not be cached in {slot.parent} ({exc.strerror}); "
            "the next run decodes them again")


def _write_whole(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _names(main: list, test: list | None) -> list[str]:
    return [f[0] for f in main] + [f"test:{f[0]}" for f in test or []]


# ---- folders: decoding on every core -----------------------------------------------------

_HEADERS: dict[str, list] = {}  # cache key -> per file (width, height, gray) or a reason



def _full_paths(want: Want, main: list, test: list | None) -> list[str]:
    return ([os.path.join(want.path, f[0]) for f in main]
            + [os.path.join(want.test_path, f[0]) for f in test or []])


def _headers_of(want: Want, main: list, test: list | None, key: str, pool: Any = None) -> list:
    if key not in _HEADERS:
        paths = _full_paths(want, main, test)
        heads: list = [None] * len(paths)
        with imagefiles.pool(len(paths)) if pool is None else _same(pool) as p:
            for s, part in imagefiles.run_chunks(p, imagefiles.headers, paths):
                heads[s:s + len(part)] = part
        _HEADERS[key] = heads
    return _HEADERS[key]


@contextmanager
def _same(pool: Any) -> Iterator[Any]:
    yield pool


def _resolve(want: Want, heads: list, main: list, test: list | None) -> tuple[list[int], bool]:
    """(C, H, W) and whether every image is grayscale, from the readable files' headers."""
    good = [h for h in heads if not isinstance(h, str)]
    if not good:
        raise DataError(f"data.path: none of the {len(heads):,} image files under "
                        f"{want.path} can be read: {_examples(want, heads, main, test)}")
    gray = all(h[2] for h in good)
    channels = want.channels or (1 if gray else 3)
    if want.size is not None:
        return [channels, *want.size], gray
    sizes = Counter((h[1], h[0]) for h in good)
    if len(sizes) > 1:
        names = _names(main, test)
        first = {}
        for i, h in enumerate(heads):
            if not isinstance(h, str):
                first.setdefault((h[1], h[0]), names[i])
        listed = ", ".join(f"{w}x{h} ({n:,}, e.g. {first[(h, w)]})"
                           for (h, w), n in sizes.most_common(3))
        raise DataError(f"data.image_size: the images under {want.path} differ in size "
                        f"({len(sizes)} sizes, width x height: {listed}); set data.image_size "
                        "(a number, or [height, width]) to bring them to one size, a centred "
                        "resize-and-crop that keeps the aspect ratio")
    (h, w), _ = sizes.most_common(1)[0]
    return [channels, h, w], gray


def _examples(want: Want, bad: dict | list, main: list, test: list | None) -> str:
    names = _names(main, test)
    items = bad.items() if isinstance(bad, dict) else [
        (i, h) for i, h in enumerate(bad) if isinstance(h, str)]
    items = list(items)
    shown = ", ".join(f"{names[i]} ({why})" for i, why in items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _refuse_unreadable(want: Want, bad: dict, main: list, test: list | None) -> None:
    if bad and not want.skip_unreadable:
        raise DataError(
            f"data.path: {len(bad):,} of the {len(main) + len(test or []):,} image files under "
            f"{want.path}{' and ' + want.test_path if test else ''} cannot be read: "
            f"{_examples(want, bad, main, test)}; remove or fix them, or set "
            "data.skip_unreadable: true to leave them out")


def _decode_folder(want: Want, main: list, test: list | None, key: str) -> Images:
    """Decode every readable file once, on every core, each straight into its row."""
    paths = _full_paths(want, main, test)
    t0 = time.perf_counter()
    with imagefiles.pool(len(paths)) as pool:
        bad: dict[int, str] = {}
        if want.size is None or want.channels is None:
            heads = _headers_of(want, main, test, key, pool)
            shape, gray = _resolve(want, heads, main, test)
            bad = {i: h for i, h in enumerate(heads) if isinstance(h, str)}
            _refuse_unreadable(want, bad, main, test)
        else:
            shape, gray = [want.channels, *want.size], True
        parts = [(0, len(main))] + ([(len(main), len(paths))] if test else [])
        orders = [_order(lo, hi, bad) for lo, hi in parts]  # file indices, row by row
        outs = [np.empty((len(order), *shape), dtype=np.uint8) for order in orders]
        part_of, row_of = np.zeros(len(paths), np.int64), np.zeros(len(paths), np.int64)
        for k, order in enumerate(orders):
            part_of[order], row_of[order] = k, np.arange(len(order))
        todo = [i for i in range(len(paths)) if i not in bad]
        for s, (block, status) in imagefiles.run_chunks(
                pool, imagefiles.decode_many, [paths[i] for i in todo], tuple(shape),
                want.size is not None):
            for j, st in enumerate(status):
                i = todo[s + j]
                if isinstance(st, str):
                    bad[i] = st
                else:
                    outs[part_of[i]][row_of[i]] = block[j]
                    gray = gray and st
        cores = imagefiles.workers() if pool is not None else 1
    _refuse_unreadable(want, bad, main, test)
    kept = [_without(out, order, bad) for out, order in zip(outs, orders)]
    n = sum(len(out) for out, _ in kept)
    dt = time.perf_counter() - t0
    say(f"data: decoded {n:,} images of {want.path} in {dt:.1f} s on {cores} core(s) "
        f"({n / dt:,.0f} images/s); cached for the next run")
    names = _names(main, test)
    (images, order), (test_images, test_order) = kept[0], (kept[1] if test else (None, None))
    return Images(images, test_images, [names[i] for i in order],
                  None if test is None else [names[i].removeprefix("test:") for i in test_order],
                  [names[i] for i in sorted(bad) if i < len(main)],
                  [names[i] for i in sorted(bad) if i >= len(main)], gray, key)


def _order(lo: int, hi: int, bad: dict) -> np.ndarray:
    """Files ``lo..hi-1`` (one folder) in their kept order: shuffled with TEST_SEED, the
    unreadable ones left out."""
    order = lo + np.random.default_rng(TEST_SEED).permutation(hi - lo)
    return order[np.array([i not in bad for i in order], dtype=bool)] if bad else order


def _without(out: np.ndarray, order: np.ndarray, bad: dict) -> tuple[np.ndarray, np.ndarray]:
    """The rows of files found unreadable while decoding, taken out (a copy only then)."""
    keep = np.array([i not in bad for i in order], dtype=bool)
    return (out, order) if keep.all() else (out[keep], order[keep])


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


def _probe_arrays(want: Want) -> dict:
    heads = [_array_shape(want, want.path, "data.path")]
    if want.test_path:
        heads.append(_array_shape(want, want.test_path, "data.test_path"))
    c, h, w = _array_target(want, heads)
    return {"shape": [c, h, w], "images": heads[0][0],
            "test_images": heads[1][0] if want.test_path else None,
            "grayscale": all(hd[1] == 1 for hd in heads), "skipped": [], "test_skipped": [],
            "cached": False, "fingerprint": _arrays_key(want)}


def _arrays_key(want: Want) -> str:
    parts = [_array_key(want.path)] + ([_array_key(want.test_path)] if want.test_path else [])
    text = json.dumps([DECODE_VERSION, parts, want.size, want.channels, want.layout])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_arrays(want: Want) -> Images:
    heads = [_array_shape(want, want.path, "data.path")]
    if want.test_path:
        heads.append(_array_shape(want, want.test_path, "data.test_path"))
    target = _array_target(want, heads)
    out = [imagefiles.convert_array(imagefiles.open_array(p, where), hd[4], target, f"{where}: {p}")
           for p, where, hd in zip((want.path, want.test_path), ("data.path", "data.test_path"),
                                   heads)]
    return Images(out[0], out[1] if len(out) > 1 else None,
                  grayscale=all(hd[1] == 1 for hd in heads), key=_arrays_key(want))

"""A folder of image files as one uint8 array: listing, decoding on every core, the cache.

``cae.data.userdata`` turns a folder into a dataset; this module reads it. The files are listed
(sorted relative paths, sizes and modification times: the cache key), looked at (their
headers, when the size or the channels are not given) and decoded in worker processes,
each image straight into its row of one preallocated array, in a seeded random order (so
the held-out test images and the first N of a limit are fair samples). The decoded arrays
go to ``DATA_DIR/decoded/`` and are read back whole, without any copy, while no file has
changed. The bookkeeping per file is kept small (a few numbers in NumPy arrays and its
relative path), so that a folder of tiny images does not cost more than its pixels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cae.data import imagefiles
from cae.data.imagefiles import DataError

if TYPE_CHECKING:
    from cae.data.userdata import Want

TEST_SEED = 1729  # the order a folder's images are kept in: which are held out for testing
DECODE_VERSION = 1  # part of every cache key: bump when decoding changes
MAX_NAMED = 5  # unreadable files named in a message


def say(line: str) -> None:
    """One line about what the data loading did (decoded, or read from the cache)."""
    print(line, flush=True)


@dataclass
class Listing:
    """The image files under a folder: relative paths (sorted) and (size, mtime in ns), and
    the symbolic links left out (``scan``)."""

    root: str
    names: np.ndarray  # (N,) bytes (the file system's encoding), sorted
    stats: np.ndarray  # (N, 2) int64
    left_out: list[str] = field(default_factory=list)  # "relative path: why"

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return os.fsdecode(self.names[i])


@dataclass
class Images:
    """A user dataset as read: its images in their kept order; for a folder, which file
    each row is (``order`` indexes ``names``)."""

    images: np.ndarray  # (N, C, H, W) uint8
    test: np.ndarray | None  # from test_path
    names: np.ndarray | None = None  # a folder's Listing.names
    order: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    test_skipped: list[str] = field(default_factory=list)
    grayscale: bool = False
    key: str = ""

    @property
    def paths(self) -> list[str] | None:
        """The relative path of each image (a folder's), row by row."""
        return None if self.order is None else [os.fsdecode(n) for n in self.names[self.order]]

    def summary(self) -> dict:
        """What a run records of these images (and the cache keeps beside them): shape,
        counts, grayscale and the files left out."""
        return {"shape": list(self.images.shape[1:]), "images": len(self.images),
                "test_images": None if self.test is None else len(self.test),
                "grayscale": self.grayscale, "skipped": self.skipped,
                "test_skipped": self.test_skipped}


# ---- listing and keys ------------------------------------------------------------------------


def listing(path: str, where: str) -> Listing:
    """Every image file under ``path`` (a clear error for a missing, wrong or empty one);
    each symbolic link left out is named in one line, once per process."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{where}: {path} does not exist")
    if not p.is_dir():
        raise DataError(f"{where}: {path} is a file, and dataset 'folder' reads a folder of "
                        "images (for a .npy or .npz file use dataset: arrays)")
    found = scan(path)
    for note in found.left_out:
        if (path, note) not in _SAID:
            _SAID.add((path, note))
            say(f"data: left out {os.path.join(path, note)}")
    if len(found) == 0:
        kinds = ", ".join(s.lstrip(".").upper() for s in imagefiles.IMAGE_SUFFIXES)
        raise DataError(f"{where}: {path} holds no image files ({kinds}) at any depth")
    return found


_SAID: set[tuple[str, str]] = set()  # the links left out that ``listing`` has named


def scan(root: str) -> Listing:
    """Every image file under ``root`` at any depth, sorted by relative path; hidden files
    and folders are left out. Sizes and times go straight into compact arrays: a listing of
    60,000 files holds their names (as bytes, in one array) and 16 bytes each, nothing
    more.

    Symbolic links are followed, but a folder is never entered from inside itself: a link
    back to a folder above it (a loop, which would repeat its images without end) is left
    out, as is a link that cannot be followed (one that leads back to itself);
    ``left_out`` names them."""
    from array import array

    names, stats, left_out = [], array("q"), []
    stack = [(root, "", (_folder_id(root),))]
    while stack:
        folder, rel, above = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            raise DataError(f"{folder}: cannot be listed ({exc.strerror})") from None
        with entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    is_dir = e.is_dir()
                    folder_id = _folder_id(e) if is_dir else None
                except OSError as exc:  # a link to itself, or to what cannot be looked at
                    left_out.append(f"{rel}{e.name}: cannot be followed ({exc.strerror})")
                    continue
                if folder_id in above:
                    left_out.append(f"{rel}{e.name}: a symbolic link back to a folder above "
                                    f"it ({os.path.realpath(e.path)}), not followed again")
                elif is_dir:
                    stack.append((e.path, f"{rel}{e.name}/", (*above, folder_id)))
                elif e.name.lower().endswith(imagefiles.IMAGE_SUFFIXES) and e.is_file():
                    st = e.stat()
                    names.append(os.fsencode(rel + e.name))
                    stats.extend((st.st_size, st.st_mtime_ns))
    raw = np.array(names, dtype=bytes) if names else np.zeros(0, dtype="S1")
    del names
    order = np.argsort(raw, kind="stable")  # bytes order: UTF-8 sorts as the characters do
    table = np.frombuffer(stats, dtype=np.int64).reshape(-1, 2)[order]
    return Listing(root, raw[order], table, sorted(left_out))


def _folder_id(folder: str | os.DirEntry) -> tuple[int, int]:
    """What tells one folder from another however it is reached: (device, inode)."""
    st = folder.stat() if isinstance(folder, os.DirEntry) else os.stat(folder)
    return st.st_dev, st.st_ino


def key_of(want: Want, main: Listing, test: Listing | None) -> str:
    """Changes whenever a file is added, removed, resized or touched, or a setting changes."""
    h = hashlib.sha256(json.dumps([DECODE_VERSION, want.path, want.test_path, want.size,
                                   want.channels, want.skip_unreadable]).encode())
    for part in (main, test):
        if part is not None:
            h.update(part.names.dtype.str.encode() + part.names.tobytes() + b"\1")
            h.update(part.stats.tobytes())
    return h.hexdigest()[:24]


class _Files:
    """The files of a folder and of its test folder, numbered one after the other."""

    def __init__(self, main: Listing, test: Listing | None):
        self.main, self.test = main, test
        self.n_main = len(main)
        self.n = self.n_main + (len(test) if test else 0)

    def name(self, i: int) -> str:
        return self.main.name(i) if i < self.n_main else (
            f"test:{self.test.name(i - self.n_main)}")

    def path(self, i: int) -> str:
        part, j = (self.main, i) if i < self.n_main else (self.test, i - self.n_main)
        return os.path.join(part.root, part.name(j))

    def examples(self, bad: dict[int, str]) -> str:
        items = sorted(bad.items())
        shown = ", ".join(f"{self.name(i)} ({why})" for i, why in items[:MAX_NAMED])
        return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


# ---- the cache -------------------------------------------------------------------------------


def _slot(cache_root: Path, want: Want) -> Path:
    """One cache entry per folder and settings: a new decode replaces the old one."""
    text = json.dumps([want.path, want.test_path, want.size, want.channels,
                       want.skip_unreadable])
    return cache_root / "decoded" / hashlib.sha256(text.encode()).hexdigest()[:16]


def read_meta(cache_root: Path, want: Want, key: str) -> dict | None:
    """The cache's record of ``want`` if it holds the files as they are now."""
    try:
        meta = json.loads(_slot(cache_root, want).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("key") == key else None


# The arrays of a cache entry (entries written before may also hold a ".test_order.npy",
# which nothing reads).
_PARTS = (("images", ".npy"), ("test", ".test.npy"), ("order", ".order.npy"))


def read_cache(cache_root: Path, want: Want, main: Listing, test: Listing | None,
               key: str) -> Images | None:
    """The decoded images from the cache, or None when it does not hold them."""
    meta = read_meta(cache_root, want, key)
    if meta is None:
        return None
    slot = _slot(cache_root, want)
    arrays = {}
    try:
        for name, suffix in _PARTS:
            if name == "test" and test is None:
                arrays[name] = None
            else:
                arrays[name] = np.load(slot.with_suffix(suffix))
    except (OSError, ValueError):
        return None
    if list(arrays["images"].shape) != [meta["images"], *meta["shape"]]:
        return None
    n = meta["images"] + (meta["test_images"] or 0)
    say(f"data: {n:,} images of {want.path} from the cache (decoded {meta['created']}; "
        "--refresh-data decodes them again)")
    return Images(**arrays, names=main.names, skipped=meta["skipped"],
                  test_skipped=meta["test_skipped"], grayscale=meta["grayscale"], key=key)


def write_cache(cache_root: Path, want: Want, got: Images) -> None:
    """Keep the decoded images for the next run (each file written whole, then renamed)."""
    slot = _slot(cache_root, want)
    meta = {"key": got.key, "path": want.path, "test_path": want.test_path, **got.summary(),
            "created": time.strftime("%Y-%m-%d %H:%M")}
    try:
        slot.parent.mkdir(parents=True, exist_ok=True)
        for name, suffix in _PARTS:
            array = getattr(got, name)
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


# ---- headers: size, channels, unreadable files -----------------------------------------------


@dataclass
class Headers:
    """Per file: width, height and grayscale from its header; the unreadable ones' reasons."""

    width: np.ndarray
    height: np.ndarray
    gray: np.ndarray
    bad: dict[int, str]


_HEADERS: dict[str, Headers] = {}  # cache key -> headers, for the load after a probe


def headers(files: _Files, key: str, pool=None) -> Headers:
    """Every file's header (read on every core), once per process and key."""
    if key not in _HEADERS:
        heads = Headers(np.zeros(files.n, np.int32), np.zeros(files.n, np.int32),
                        np.zeros(files.n, bool), {})
        with imagefiles.pool(files.n) if pool is None else contextlib.nullcontext(pool) as p:
            for s, part in imagefiles.run_chunks(p, imagefiles.headers, files.n, files.path):
                for j, h in enumerate(part):
                    if isinstance(h, str):
                        heads.bad[s + j] = h
                    else:
                        heads.width[s + j], heads.height[s + j], heads.gray[s + j] = h
        _HEADERS[key] = heads
    return _HEADERS[key]


def forget() -> None:
    _HEADERS.clear()
    _SAID.clear()


def resolve(want: Want, files: _Files, heads: Headers) -> tuple[list[int], bool]:
    """(C, H, W) and whether every readable image is grayscale, from their headers."""
    good = np.ones(files.n, bool)
    good[list(heads.bad)] = False
    if not good.any():
        raise DataError(f"data.path: none of the {files.n:,} image files under {want.path} "
                        f"can be read: {files.examples(heads.bad)}")
    gray = bool(heads.gray[good].all())
    channels = want.channels or (1 if gray else 3)
    if want.size is not None:
        return [channels, *want.size], gray
    sizes, first, counts = np.unique(np.stack([heads.width[good], heads.height[good]], 1),
                                     axis=0, return_index=True, return_counts=True)
    if len(sizes) > 1:
        where = np.flatnonzero(good)
        top = np.argsort(-counts, kind="stable")[:3]
        listed = ", ".join(f"{sizes[k][0]}x{sizes[k][1]} ({counts[k]:,}, e.g. "
                           f"{files.name(int(where[first[k]]))})" for k in top)
        raise DataError(f"data.image_size: the images under {want.path} differ in size "
                        f"({len(sizes)} sizes, width x height: {listed}); set data.image_size "
                        "(a number, or [height, width]) to bring them to one size, a centred "
                        "resize-and-crop that keeps the aspect ratio")
    return [channels, int(sizes[0][1]), int(sizes[0][0])], gray


def refuse_unreadable(want: Want, files: _Files, bad: dict[int, str]) -> None:
    if bad and not want.skip_unreadable:
        raise DataError(
            f"data.path: {len(bad):,} of the {files.n:,} image files under {want.path}"
            f"{' and ' + want.test_path if files.test else ''} cannot be read: "
            f"{files.examples(bad)}; remove or fix them, or set data.skip_unreadable: true "
            "to leave them out")


def probe(want: Want, main: Listing, test: Listing | None, key: str, cache_root: Path,
          refresh: bool = False) -> dict:
    """A folder's facts from the cache's record, else from the headers (none are read when
    the size and the channels are given: unreadable files are then found by decoding)."""
    meta = None if refresh else read_meta(cache_root, want, key)
    if meta is not None:
        return {k: meta[k] for k in ("shape", "images", "test_images", "grayscale", "skipped",
                                     "test_skipped")} | {"cached": True, "fingerprint": key}
    files = _Files(main, test)
    bad: dict[int, str] = {}
    gray = None
    if want.size is not None and want.channels is not None:
        shape = [want.channels, *want.size]
    else:
        heads = headers(files, key)
        shape, gray = resolve(want, files, heads)
        bad = heads.bad
        refuse_unreadable(want, files, bad)
    bad_main = sorted(i for i in bad if i < files.n_main)
    bad_test = sorted(i for i in bad if i >= files.n_main)
    return {"shape": list(shape), "images": files.n_main - len(bad_main),
            "test_images": None if test is None else files.n - files.n_main - len(bad_test),
            "grayscale": gray, "skipped": [files.name(i) for i in bad_main],
            "test_skipped": [files.name(i).removeprefix("test:") for i in bad_test],
            "cached": False, "fingerprint": key}


# ---- decoding --------------------------------------------------------------------------------


def _order(lo: int, hi: int, bad: dict) -> np.ndarray:
    """Files ``lo..hi-1`` (one folder) in their kept order: shuffled with TEST_SEED, the
    unreadable ones left out."""
    order = lo + np.random.default_rng(TEST_SEED).permutation(hi - lo)
    return order[_readable(order, bad)] if bad else order


def _readable(order: np.ndarray, bad: dict) -> np.ndarray:
    """Which of the file numbers ``order`` are not in ``bad`` (a boolean mask)."""
    return ~np.isin(order, np.fromiter(bad, np.int64, len(bad)))


def decode(want: Want, main: Listing, test: Listing | None, key: str) -> Images:
    """Decode every readable file once, on every core, each straight into its row."""
    files = _Files(main, test)
    t0 = time.perf_counter()
    with imagefiles.pool(files.n) as pool:
        bad: dict[int, str] = {}
        if want.size is None or want.channels is None:
            heads = headers(files, key, pool)
            shape, gray = resolve(want, files, heads)
            bad = dict(heads.bad)
            refuse_unreadable(want, files, bad)
        else:
            shape, gray = [want.channels, *want.size], True
        parts = [(0, files.n_main)] + ([(files.n_main, files.n)] if test else [])
        orders = [_order(lo, hi, bad) for lo, hi in parts]  # file numbers, row by row
        outs = [np.empty((len(order), *shape), dtype=np.uint8) for order in orders]
        row_of = np.full(files.n, -1, np.int64)
        for order in orders:
            row_of[order] = np.arange(len(order))
        todo = np.flatnonzero(row_of >= 0)  # the files to decode, in sorted order
        for s, (block, status) in imagefiles.run_chunks(
                pool, imagefiles.decode_many, len(todo), lambda k: files.path(int(todo[k])),
                tuple(shape), want.size is not None):
            for j, st in enumerate(status):
                i = int(todo[s + j])
                if isinstance(st, str):
                    bad[i] = st
                else:
                    outs[0 if i < files.n_main else 1][row_of[i]] = block[j]
                    gray = gray and st
        cores = imagefiles.workers() if pool is not None else 1
    refuse_unreadable(want, files, bad)
    kept = [_without(out, order, bad) for out, order in zip(outs, orders)]
    n = sum(len(out) for out, _ in kept)
    dt = time.perf_counter() - t0
    say(f"data: decoded {n:,} images of {want.path} in {dt:.1f} s on {cores} core(s) "
        f"({n / dt:,.0f} images/s); cached for the next run")
    (images, order), test_images = kept[0], (kept[1][0] if test else None)
    return Images(images, test_images, main.names, order.astype(np.int32),
                  [files.name(i) for i in sorted(bad) if i < files.n_main],
                  [files.name(i).removeprefix("test:") for i in sorted(bad)
                   if i >= files.n_main], gray, key)


def _without(out: np.ndarray, order: np.ndarray, bad: dict) -> tuple[np.ndarray, np.ndarray]:
    """The rows of files found unreadable while decoding, taken out (a copy only then)."""
    if not bad:
        return out, order
    keep = _readable(order, bad)
    return (out, order) if keep.all() else (out[keep], order[keep])

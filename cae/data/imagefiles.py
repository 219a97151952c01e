"""Reading image and array files into uint8 arrays: the pixels of a user's dataset.

``cae.data.userdata`` decides which files make a dataset and splits them, ``cae.data.imagefolder``
lists a folder's and caches its decoded images; this module only reads: an image file's
header (size, grayscale or not) or its pixels (converted to grayscale or RGB, resized with
a centred crop that keeps the aspect ratio), chunks of files in worker processes on every
core, and NumPy array files in any of the layouts a dataset may come in. It imports nothing
of cae but the error type, so the worker processes start light.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cae.config.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF", ".webp": "WEBP"}  # tried first: Pillow need not try every plugin
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
PARALLEL_FROM = 256  # files; fewer are decoded in this process (no pool to start)


class DataError(UserError, ValueError):
    """A folder or array file that cannot be used as it is; the message names the file.

    A :class:`UserError` for the command line, and a ValueError so that a config validator
    turns it into a validation error that names the grid point."""


# ---- worker processes -------------------------------------------------------------------


def workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


class Workers:
    """Worker processes, one per core, each a fresh ``python -m cae.data.imagefiles`` that runs
    the functions of this module on the chunks it is sent (pickled over its pipes).

    Fresh interpreters, not multiprocessing: a fork would copy a parent that may be running
    torch's or Ray's threads, and multiprocessing's spawn and forkserver re-import the
    parent's main script in every worker (a script without a ``__main__`` guard would run
    again)."""

    def __init__(self, n: int):
        import subprocess
        import sys

        here = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [here, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.procs = [subprocess.Popen([sys.executable, "-m", "cae.data.imagefiles"], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                      for _ in range(n)]

    def map(self, fn: Callable, starts: list[int], chunk: Callable[[int], list], *args
            ) -> Iterator[tuple[int, Any]]:
        """(start, ``fn(chunk(start), *args)``) for every start, in the order they finish;
        what a worker that died left undone is not yielded (the caller does it)."""
        import pickle
        import selectors

        todo, busy = list(starts)[::-1], {}
        sel = selectors.DefaultSelector()

        def feed(proc) -> None:
            if not todo:
                return
            start = todo.pop()
            pickle.dump((fn.__name__, chunk(start), args), proc.stdin, protocol=5)
            proc.stdin.flush()
            busy[proc] = start

        for proc in self.procs:
            try:
                feed(proc)
                sel.register(proc.stdout, selectors.EVENT_READ, proc)
            except OSError:  # a worker that could not start
                busy.pop(proc, None)
        while busy:
            for key, _ in sel.select():
                proc = key.data
                try:
                    result = pickle.load(proc.stdout)
                except (EOFError, OSError, pickle.UnpicklingError):
                    sel.unregister(proc.stdout)
                    busy.pop(proc)  # its chunk is done by the caller
                    continue
                yield busy.pop(proc), result
                try:
                    feed(proc)
                except OSError:
                    sel.unregister(proc.stdout)
        sel.close()

    def close(self) -> None:
        """End the workers: with their pipes closed, one still busy (the caller stopped
        reading) fails to write its result and exits too."""
        for proc in self.procs:
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        for proc in self.procs:
            proc.wait()


@contextmanager
def pool(n_files: int) -> Iterator[Workers | None]:
    """Worker processes on every core, or None (decode here) for a few files or one core."""
    if workers() < 2 or n_files < PARALLEL_FROM:
        yield None
        return
    try:
        procs = Workers(workers())
    except OSError:  # no processes allowed here: decode in this one
        yield None
        return
    try:
        yield procs
    finally:
        procs.close()


def run_chunks(pool: Workers | None, fn: Callable, n: int, item: Callable[[int], Any], *args
               ) -> Iterator[tuple[int, Any]]:
    """``fn([item(k) for k in chunk], *args)`` over chunks of ``range(n)``: (start of the
    chunk, its result), in the order they finish; what the workers could not do (one died)
    is done here. Items are made when their chunk is sent, not all at once."""
    size = max(16, min(256, math.ceil(n / (8 * max(1, workers())))))
    todo = dict.fromkeys(range(0, n, size))

    def chunk(start: int) -> list:
        return [item(k) for k in range(start, min(start + size, n))]

    if pool is not None:
        for s, result in pool.map(fn, list(todo), chunk, *args):
            del todo[s]
            yield s, result
    for s in list(todo):
        yield s, fn(chunk(s), *args)


def _is_gray(im: Any) -> bool:
    if im.mode in GRAY_MODES:
        return True
    if im.mode == "P":
        pal = np.asarray(im.getpalette() or [0, 0, 1], dtype=np.uint8).reshape(-1, 3)
        return bool((pal[:, 0] == pal[:, 1]).all() and (pal[:, 1] == pal[:, 2]).all())
    return False


def _why(exc: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_image(path: str) -> Any:
    """``PIL.Image.open``, trying the format the file's suffix names first (a file named
    for another format is still recognised)."""
    from PIL import Image

    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is not None:
        try:
            return Image.open(path, formats=[fmt])
        except Image.UnidentifiedImageError:
            pass
    return Image.open(path)


def headers(paths: list[str]) -> list:
    """Per file (width, height, grayscale) from its header alone, or why it cannot be read."""
    out: list = []
    for p in paths:
        try:
            with open_image(p) as im:
                out.append((im.width, im.height, _is_gray(im)))
        except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the file is bad
            out.append(_why(exc))
    return out


def decode_image(path: str, shape: tuple[int, int, int], fit: bool) -> tuple[np.ndarray, bool]:
    """One file -> uint8 (H, W) or (H, W, 3) of ``shape`` (C, H, W), and whether it was
    grayscale. ``fit``: a centred resize-and-crop keeping the aspect ratio; else the image
    must have that size already. JPEGs are decoded at a reduced scale where that is still
    at least the size asked for (libjpeg's DCT scaling: fast, and antialiased)."""
    from PIL import Image, ImageOps

    c, h, w = shape
    with open_image(path) as im:
        gray = _is_gray(im)
        mode = "L" if c == 1 else "RGB"
        if fit and im.format == "JPEG":
            s = max(w / im.width, h / im.height)
            im.draft(mode, (math.ceil(im.width * s), math.ceil(im.height * s)))
        im = _to_mode(im, mode)
        if (im.height, im.width) != (h, w):
            if not fit:
                raise ValueError(f"is {im.width}x{im.height}, not {w}x{h}")
            im = ImageOps.fit(im, (w, h), Image.Resampling.BICUBIC)
        return np.asarray(im), gray


def _to_mode(im: Any, mode: str) -> Any:
    """``im`` converted to L or RGB; 16-bit grayscale scaled down, not clipped."""
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float32)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8))
    return im if im.mode == mode else im.convert(mode)


def decode_many(paths: list[str], shape: tuple[int, int, int], fit: bool
                ) -> tuple[np.ndarray, list]:
    """Files -> uint8 (n, C, H, W) and, per file, whether it was grayscale or why it cannot
    be read (its row is then left as it is). Run in the worker processes."""
    c, h, w = shape
    out = np.empty((len(paths), h, w, c), dtype=np.uint8)
    status: list = []
    for i, p in enumerate(paths):
        try:
            img, gray = decode_image(p, shape, fit)
            out[i] = img.reshape(h, w, c)
            status.append(gray)
        except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the file is bad
            status.append(_why(exc))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), status  # (n, C, H, W)



# ---- array files ------------------------------------------------------------------------


def array_layout(shape: tuple[int, ...], layout: str, where: str) -> str:
    """How an array's axes are laid out: ``nhw`` (3 axes: one channel), else ``nhwc`` or
    ``nchw`` as ``layout`` says; ``auto`` reads a last axis of 1 or 3 as channels
    (N x H x W x C), else a second axis of 1 or 3 (N x C x H x W), and asks for ``layout``
    when both axes could be the channels."""
    if len(shape) == 3:
        if layout not in ("auto", "nhw"):
            raise DataError(f"{where}: layout {layout!r} needs 4 axes; the array is "
                            f"{dims(shape)} (N x H x W)")
        return "nhw"
    if len(shape) != 4:
        raise DataError(f"{where}: the array is {dims(shape)}; images are N x H x W, "
                        "N x H x W x C or N x C x H x W")
    if layout == "nhw":
        raise DataError(f"{where}: layout 'nhw' needs 3 axes; the array is {dims(shape)}")
    if layout != "auto":
        return layout
    last, second = shape[3] in (1, 3), shape[1] in (1, 3)
    if last and second:
        raise DataError(f"{where}: the array is {dims(shape)}: its second and last axes could "
                        "both be the channels; set data.layout: nhwc or nchw")
    if not (last or second):
        raise DataError(f"{where}: the array is {dims(shape)}: neither its second nor its "
                        "last axis is 1 or 3 channels (grayscale or RGB)")
    return "nhwc" if last else "nchw"


def dims(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape)) if shape else "a single number"


def array_file(path: str, where: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{where}: {path} does not exist")
    if p.is_dir() or p.suffix.lower() not in ARRAY_SUFFIXES:
        raise DataError(f"{where}: {path} is not a .npy or .npz file (dataset 'arrays'; for a "
                        "folder of images use dataset: folder)")
    return p


def open_array(path: str, where: str) -> np.ndarray:
    """The image array of a .npy (memory-mapped) or .npz (its ``images``, or its only array)."""
    p = array_file(path, where)
    try:
        if p.suffix.lower() == ".npy":
            return np.load(p, mmap_mode="r")
        with np.load(p) as npz:
            names = list(npz.files)
            if "images" not in names and len(names) != 1:
                raise DataError(f"{where}: {path} holds {len(names)} arrays "
                                f"({', '.join(names[:8])}) and none is called 'images'")
            return npz["images" if "images" in names else names[0]]
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: {path} cannot be read as a NumPy file ({exc})") from None


def array_header(path: str, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the file's header (a .npz member is not decompressed)."""
    p = array_file(path, where)
    if p.suffix.lower() == ".npy":
        a = open_array(path, where)
        return a.shape, a.dtype
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith(".npy")]
            name = "images.npy" if "images.npy" in names else (names[0] if len(names) == 1
                                                                else None)
            if name is None:
                open_array(path, where)  # raises, naming the arrays
            with z.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: {path} cannot be read as a NumPy file ({exc})") from None
    return shape, dtype



def convert_array(a: np.ndarray, layout: str, target: tuple[int, int, int], where: str,
                  chunk: int = 4096) -> np.ndarray:
    """An image array as stored -> uint8 (N, C, H, W) of ``target`` (C, H, W), chunk by
    chunk (a memory-mapped file is never read whole into floats)."""
    c, h, w = target
    out = np.empty((len(a), c, h, w), dtype=np.uint8)
    for s in range(0, len(a), chunk):
        block = np.asarray(a[s:s + chunk])
        block = {"nhw": lambda b: b[:, None], "nhwc": lambda b: b.transpose(0, 3, 1, 2),
                 "nchw": lambda b: b}[layout](block)  # (B, C0, H0, W0)
        if block.dtype != np.uint8:
            lo, hi = float(np.min(block)), float(np.max(block))
            if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
                held = ("NaN" if math.isnan(lo) or math.isnan(hi)
                        else f"values from {lo:g} to {hi:g}")
                raise DataError(f"{where}: float images must lie in [0, 1], and images "
                                f"{s:,}..{s + len(block) - 1:,} hold {held}; scale them (or "
                                "store uint8 in [0, 255])")
            block = np.rint(block * 255.0).astype(np.uint8)
        out[s:s + len(block)] = _fit_block(_channels(block, c), h, w)
    return out


def _channels(block: np.ndarray, c: int) -> np.ndarray:
    """uint8 (B, C0, H, W) -> (B, c, H, W): RGB to luma as PIL converts, gray repeated."""
    if block.shape[1] == c:
        return block
    if c == 3:
        return np.repeat(block, 3, axis=1)
    r, g, b = (block[:, i].astype(np.uint32) for i in range(3))
    return ((r * 299 + g * 587 + b * 114 + 500) // 1000).astype(np.uint8)[:, None]


def _fit_block(block: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize-and-crop every image of (B, C, H0, W0) to (h, w), as a folder's are."""
    if block.shape[2:] == (h, w):
        return block
    from PIL import Image, ImageOps

    out = np.empty((len(block), block.shape[1], h, w), dtype=np.uint8)
    for i, img in enumerate(block):
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        fitted = np.asarray(ImageOps.fit(pil, (w, h), Image.Resampling.BICUBIC))
        out[i] = fitted[None] if fitted.ndim == 2 else fitted.transpose(2, 0, 1)
    return out


def _serve() -> None:
    """A worker's loop: (function name, chunk, args) in, its result out, until stdin ends."""
    import pickle
    import sys

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but results on the pipe
    while True:
        try:
            name, chunk, args = pickle.load(stdin)
        except EOFError:
            return
        pickle.dump(globals()[name](chunk, *args), stdout, protocol=5)
        stdout.flush()


if __name__ == "__main__":
    _serve()

"""Build ``cae/sample/fashion_mnist_sample.npz``: the small real dataset shipped in the package.

The sample lets the quickstart and the tests run offline. It is a class-balanced subset of
the official Fashion-MNIST archives (MIT, (c) 2017 Zalando SE): 400 training images per
class (4000) and 100 test images per class (1000), drawn with a fixed seed, kept in their
original order (which is already shuffled), and saved with their labels and their indices
in the official files, so anyone can check or rebuild it.

Usage::

    python scripts/make_sample.py --data-dir DATA_ROOT [--out cae/sample/fashion_mnist_sample.npz]

``DATA_ROOT`` holds ``FashionMNIST/raw/*-idx?-ubyte.gz`` as torchvision lays it out. The
archives are read directly (gzip + numpy) and checked against the official md5 sums; nothing
is written next to them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np

# The official archives and their md5 sums (as hard-coded in torchvision's FashionMNIST).
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}
PER_CLASS = {"train": 400, "test": 100}
SEED = 20170825  # Fashion-MNIST's release date; any fixed number would do
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cae" / "sample" / "fashion_mnist_sample.npz"


def read_idx(path: Path, md5: str) -> np.ndarray:
    """Read one gzipped idx file (the MNIST format: magic, dims, then uint8 data)."""
    raw = path.read_bytes()
    digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if digest != md5:
        raise SystemExit(f"{path}: md5 {digest} is not the official {md5}")
    data = gzip.decompress(raw)
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise SystemExit(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` samples of each class, in their original (random) order."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
        for c in range(10)
    ]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="root holding FashionMNIST/raw/")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    raw = Path(args.data_dir) / "FashionMNIST" / "raw"
    arrays = {key: read_idx(raw / name, md5) for key, (name, md5) in FILES.items()}
    rng = np.random.default_rng(SEED)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        idx = balanced_subset(arrays[f"{split}_labels"], PER_CLASS[split], rng)
        out[f"x_{split}"] = arrays[f"{split}_images"][idx]  # (N, 28, 28) uint8
        out[f"y_{split}"] = arrays[f"{split}_labels"][idx]  # (N,) uint8
        out[f"{split}_index"] = idx.astype(np.int32)  # position in the official file
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    counts = {k: v.shape for k, v in out.items()}
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes): {counts}")


if __name__ == "__main__":
    main()

"""Your own images: a first load decoded on every core, a cached reload, memory, cae encode.

The benchmark writes its own images into a temporary folder: 60,000 grayscale 28x28 PNG
files (the embedded Fashion-MNIST sample, repeated with seeded noise so that no two files
are alike) and 10,000 RGB 256x256 JPEG photographs of the same garments (scaled up, tinted,
on a shaded background, with noise), read at 64x64. Each load runs in a fresh process (so
nothing is remembered in memory, and its peak memory is its own) and is timed around
``cae.data.datasets.load``; the first load of a folder decodes it, a second one reads the cache.

- first load of the JPEGs on every core, against the same on one core (same run): the
  goal is >= 1,000 images/s, and a speed-up close to the number of cores; the CPU seconds
  the load took (the process and its workers) are recorded too, since wall time on a
  shared machine moves with the other jobs;
- cached reload of the PNGs: < 2 s (against their first load);
- memory: the load's peak (the process's peak resident memory, reset just before the load
  (Linux), minus its resident memory then; and, in separate runs, the peak of Python's
  traced allocations, numpy's included) against the bytes of the uint8 arrays it returns:
  <= 1.2x;
- ``cae encode`` of 10,000 PNGs with a model of the quickstart's architecture, the whole
  command (Python start, imports, decoding, encoding, writing): < 5 s, first run (decoding)
  and second (cached).

    python benchmarks/userdata.py           # the sizes above
    python benchmarks/userdata.py --quick   # a tenth of them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

ROUNDS = 2  # each measurement, alternating sides; the fastest is kept (least disturbed)

CHILD = r"""
import json, resource, sys, time, tracemalloc
import platformdirs, torch  # what a driver has loaded: its memory is not the data's
from cae import imagefiles, imagefolder, userdata
from cae.config.trial import DataConfig
from cae.data.datasets import load

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def high_water():  # the peak resident memory since the last reset (VmHWM)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

cfg = DataConfig.model_validate(json.loads(sys.argv[1]))
if sys.argv[2] == "1":
    imagefiles.workers = lambda: 1
trace = sys.argv[3] == "1"
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak starts again from here (Linux)
before = rss()
def cpu():  # this process's and its finished workers' CPU seconds
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                  resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

if trace:
    tracemalloc.start()
t0, c0 = time.perf_counter(), cpu()
data = load(cfg)
seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
traced = tracemalloc.get_traced_memory()[1] if trace else None
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                  "images": data.train.shape[0] + data.test.shape[0],
                  "bytes": data.train.nbytes + data.test.nbytes, "rss_before": before,
                  "peak": high_water(), "traced_peak": traced}))
"""


def sample_images():
    """The embedded sample's 5,000 real 28x28 images (uint8)."""
    import numpy as np

    from cae.config.trial import DataConfig
    from cae.data.datasets import load

    d = load(DataConfig(dataset="sample"))
    return np.concatenate([d.train.numpy(), d.test.numpy()])[:, 0]


def write_pngs(root: Path, n: int, per_folder: int) -> None:
    """``n`` grayscale 28x28 PNGs: the sample repeated, each copy with its own noise."""
    import numpy as np
    from PIL import Image

    base, rng = sample_images(), np.random.default_rng(0)
    for i in range(n):
        noise = rng.normal(0, 6, (28, 28))
        img = np.clip(base[i % len(base)] + noise, 0, 255).astype(np.uint8)
        folder = root / f"part{i // per_folder}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def write_jpegs(root: Path, n: int) -> None:
    """``n`` RGB 256x256 JPEG photographs: a garment scaled up, tinted, on a shaded
    background, with sensor-like noise."""
    import numpy as np
    from PIL import Image

    base, rng = sample_images(), np.random.default_rng(1)
    ramp = np.linspace(0, 1, 256)[None, :, None]
    root.mkdir(parents=True)
    for i in range(n):
        garment = np.asarray(Image.fromarray(base[i % len(base)]).resize(
            (256, 256), Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255
        tint, back = rng.uniform(0.3, 1.0, 3), rng.uniform(0.0, 0.5, 3)
        light = back * (0.6 + 0.4 * ramp)  # (1, 256, 3): shading across the picture
        img = garment * tint + (1 - garment) * light + rng.normal(0, 0.02, (256, 256, 3))
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(
            root / f"{i:05d}.jpg", quality=90)


def load_in_fresh_process(cfg: dict, data_dir: Path, one_core: bool = False,
                          trace: bool = False) -> dict:
    env = {**os.environ, "CAE_DATA_DIR": str(data_dir)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), "1" if one_core else "0",
                          "1" if trace else "0"], check=True, capture_output=True, text=True,
                         cwd=common.ROOT, env=env).stdout
    m = json.loads(out.strip().splitlines()[-1])
    m["images_per_s"] = m["images"] / m["seconds"]
    m["images_per_cpu_s"] = m["images"] / m["cpu_seconds"]
    m["rss_ratio"] = (m["peak"] - m["rss_before"]) / m["bytes"]
    if m["traced_peak"] is not None:
        m["traced_ratio"] = m["traced_peak"] / m["bytes"]
    return m


def quickstart_model(dest: Path) -> Path:
    """A model of the quickstart's architecture, trained one epoch on the sample, saved as
    ``cae export-models`` saves one (config.json, weights.pt)."""
    import torch
    import yaml

    from cae.config.trial import TrialConfig
    from cae.train.trainer import train

    spec = yaml.safe_load((common.ROOT / "sweeps" / "quickstart.yaml").read_text())
    cfg = TrialConfig.model_validate({**spec["trial"], "max_epochs": 1})
    result = train(cfg, evaluate_test=False)
    dest.mkdir(parents=True)
    torch.save(result.best_state, dest / "weights.pt")
    (dest / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    return dest


def encode_timed(model: Path, images: Path, out: Path, data_dir: Path) -> dict:
    """One ``cae encode`` command: its wall time and the CPU seconds it (and its decoding
    workers) took."""
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    before = cpu()
    seconds, proc = common.run_timed(
        [*common.cae_command(), "encode", str(model), "--images", str(images), "-o", str(out)],
        env={"CAE_DATA_DIR": str(data_dir)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return {"seconds": seconds, "cpu_seconds": cpu() - before}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the images")
    args = p.parse_args()
    started, info = common.now(), common.machine()
    n_png, n_jpeg = (6_000, 1_000) if args.quick else (60_000, 10_000)
    per_folder = n_png // 6
    tmp = common.tempdir("userdata")
    try:
        t0 = time.perf_counter()
        write_pngs(tmp / "pngs", n_png, per_folder)
        write_jpegs(tmp / "jpegs", n_jpeg)
        made = time.perf_counter() - t0
        pngs = {"dataset": "folder", "path": str(tmp / "pngs")}
        jpegs = {"dataset": "folder", "path": str(tmp / "jpegs"), "image_size": 64}
        # the JPEGs: every core against one, each from an empty cache, alternated
        jpeg = {"every": [], "one": []}
        for r in range(ROUNDS):
            for side in ("one", "every") if r % 2 == 0 else ("every", "one"):
                jpeg[side].append(load_in_fresh_process(
                    jpegs, tmp / f"cache-jpeg-{side}-{r}", one_core=side == "one"))
        one, every = (min(jpeg[s], key=lambda m: m["seconds"]) for s in ("one", "every"))
        # the PNGs: first load (decoding), then reloads from the cache; then traced runs
        first = load_in_fresh_process(pngs, tmp / "cache-png")
        reload = min((load_in_fresh_process(pngs, tmp / "cache-png") for _ in range(ROUNDS)),
                     key=lambda m: m["seconds"])
        traced_first = load_in_fresh_process(pngs, tmp / "cache-png-traced", trace=True)
        traced_reload = load_in_fresh_process(pngs, tmp / "cache-png-traced", trace=True)
        jpeg_traced = load_in_fresh_process(jpegs, tmp / "cache-jpeg-traced", trace=True)
        # cae encode on one part of the PNGs (10,000 files; 1,000 with --quick)
        model = quickstart_model(tmp / "model")
        enc_first, enc_again = [], []
        for r in range(ROUNDS):
            enc_data = tmp / f"cache-encode-{r}"
            enc_first.append(encode_timed(model, tmp / "pngs" / "part0", tmp / "z.npz",
                                          enc_data))
            enc_again.append(encode_timed(model, tmp / "pngs" / "part0", tmp / "z.npz",
                                          enc_data))
        enc_first, enc_again = (min(e, key=lambda m: m["seconds"]) for e in (enc_first,
                                                                              enc_again))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {
        "images": {"png": n_png, "jpeg": n_jpeg, "encode": per_folder,
                   "seconds_to_write_them": round(made, 1)},
        "rounds": ROUNDS, "note": "each figure is the fastest of its rounds",
        "jpeg_first_load": {"every_core": every, "one_core": one, "all_rounds": jpeg,
                            "speedup": every["images_per_s"] / one["images_per_s"],
                            "cores": os.cpu_count()},
        "png_first_load": first, "png_cached_reload": reload,
        "memory_traced": {"png_first_load": traced_first, "png_cached_reload": traced_reload,
                          "jpeg_first_load": jpeg_traced},
        "encode_seconds": {"first_run": enc_first, "cached": enc_again},
    }
    rows = [
        ("JPEG 256x256 -> 64x64, first load, every core", f"{every['images_per_s']:,.0f}/s",
         f"{every['seconds']:.2f} s", f"{every['rss_ratio']:.2f}x"),
        ("JPEG, first load, one core", f"{one['images_per_s']:,.0f}/s",
         f"{one['seconds']:.2f} s", f"{one['rss_ratio']:.2f}x"),
        ("PNG 28x28, first load, every core", f"{first['images_per_s']:,.0f}/s",
         f"{first['seconds']:.2f} s", f"{first['rss_ratio']:.2f}x"),
        ("PNG, cached reload", f"{reload['images_per_s']:,.0f}/s", f"{reload['seconds']:.2f} s",
         f"{reload['rss_ratio']:.2f}x"),
    ]
    print(common.table(rows, ("load", "images/s", "time", "peak / array bytes")))
    print(f"traced peak / array bytes: PNG first {traced_first['traced_ratio']:.2f}x, "
          f"PNG cached {traced_reload['traced_ratio']:.2f}x, "
          f"JPEG first {jpeg_traced['traced_ratio']:.2f}x")
    print(f"JPEG speed-up on {os.cpu_count()} cores: {figures['jpeg_first_load']['speedup']:.2f}x; "
          f"per CPU second: {every['images_per_cpu_s']:,.0f} images (every core), "
          f"{one['images_per_cpu_s']:,.0f} (one core)")
    print(f"cae encode of {per_folder:,} PNGs: {enc_first['seconds']:.2f} s (first; "
          f"{enc_first['cpu_seconds']:.2f} CPU s), {enc_again['seconds']:.2f} s (cached; "
          f"{enc_again['cpu_seconds']:.2f} CPU s)")
    path = common.write_results(common.results_path("userdata", args.quick), "userdata", info,
                                figures, started)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

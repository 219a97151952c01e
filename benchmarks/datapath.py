"""Our device-resident data path against a torchvision DataLoader with ToTensor.

Same model, optimiser, loss, batch size, seed and thread count on both sides; only the way
the batches arrive differs:

- ours: ``cae.train.trainer.Trainer.train_epoch``: the split lives on the device as uint8, each
batch
  is an index into it, converted to float there; one host sync per epoch;
- classic: what Ray Tune's PyTorch tutorial does: a torchvision dataset of PIL images with
  ``transforms.ToTensor()``, ``DataLoader(batch_size, shuffle=True, num_workers=W)``,
  ``.to(device)`` per batch and ``running_loss += loss.item()`` per step. Its dataset holds
  the very images of our training split (torchvision's ``FashionMNIST`` over a copy of
  ../shared/data, or, for the embedded sample, its uint8 arrays as PIL images the way
  torchvision's MNIST class makes them).

The classic side's training step reuses a second ``Trainer``'s model, optimiser and autocast
(same seed, so the same initial weights), so the step itself is identical to ours. Only the
training epoch is timed (no validation). The first epoch of every side is a warm-up; then
the sides alternate epoch by epoch, so a change in the machine's load hits all of them.
``ratio`` = our images/s / the fastest classic variant's images/s (goal >= 1.0 on a CPU,
>= 5 on a GPU for 28x28 CAEs). One more epoch per side, not timed for the ratio, splits the
time into data (fetch, convert, copy) and the training step (forward, backward, step), with
a device sync between the two on a GPU.

    python benchmarks/datapath.py            # Fashion-MNIST (54k training images) if found
    python benchmarks/datapath.py --quick    # the embedded sample (3,600), a smoke run

Runs on the GPU when there is one (``--device``). Writes ``benchmarks/results/datapath.json``
(``datapath-quick.json`` with --quick; ``datapath-cuda.json`` on a GPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # (puts the repository root on sys.path)

from cae.config.catalog import DATASETS  # noqa: E402

MODEL = {"channels": [4, 8], "bottleneck": "dense", "dense": [64], "latent_dim": 8}


class PILImages:
    """uint8 (N, H, W) images served one by one as PIL images through a transform,
    as torchvision's MNIST-family datasets do."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), 0


def classic_dataset(dataset: str, data_dir: str | None, train_idx, data):
    """The training split as a torchvision-style dataset of PIL images + ToTensor."""
    import torch
    from torchvision import transforms

    to_tensor = transforms.ToTensor()
    if dataset == "sample":
        return PILImages(data.train[train_idx, 0].numpy(), to_tensor), "PIL arrays of the sample"
    import torchvision.datasets as tvd

    cls = getattr(tvd, DATASETS[dataset].torchvision)
    full = cls(root=data_dir, train=True, transform=to_tensor, download=False)
    return (torch.utils.data.Subset(full, train_idx.tolist()),
            f"torchvision.datasets.{cls.__name__} + ToTensor")


def ours_epoch(trainer) -> float:
    t0 = time.perf_counter()
    trainer.train_epoch()
    trainer.epoch += 1
    if trainer.cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _step(trainer, x):
    from cae.train.hardware import autocast
    from cae.train.loop import per_sample_loss

    with autocast(trainer.precision, trainer.device):
        z = trainer.enc(trainer._inputs(x))
        out = trainer.dec(z)
    loss = per_sample_loss(trainer.cfg.loss, out, x).mean() + trainer.model.penalty(z)
    trainer.opt.zero_grad(set_to_none=True)
    loss.backward()
    trainer.opt.step()
    return loss


def classic_epoch(trainer, loader) -> float:
    """The tutorial's loop: batches from the DataLoader, .to(device), loss.item() per step."""
    trainer.model.train()
    t0 = time.perf_counter()
    running = 0.0
    for x, _ in loader:
        x = x.to(trainer.device)
        running += _step(trainer, x).item()
    return time.perf_counter() - t0


def breakdown_ours(trainer) -> dict:
    """One epoch of our loop split into data (index + convert) and step, synced between."""
    import torch

    sync = torch.cuda.synchronize if trainer.cuda else (lambda: None)
    train, n, bs = trainer.splits.train, trainer.splits.train.shape[0], trainer.cfg.batch_size
    perm = torch.randperm(n, generator=trainer.gen, device=trainer.device)
    data_s = step_s = 0.0
    trainer.model.train()
    for start in range(0, n, bs):
        t0 = time.perf_counter()
        idx = perm[start:start + bs]
        x, _, _ = trainer.task.batch(train[idx], idx, trainer.gen)
        sync()
        t1 = time.perf_counter()
        _step(trainer, x)
        sync()
        step_s += time.perf_counter() - t1
        data_s += t1 - t0
    return {"data_s": round(data_s, 4), "step_s": round(step_s, 4)}


def breakdown_classic(trainer, loader) -> dict:
    import torch

    sync = torch.cuda.synchronize if trainer.cuda else (lambda: None)
    data_s = step_s = 0.0
    trainer.model.train()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            x, _ = next(it)
        except StopIteration:
            break
        x = x.to(trainer.device)
        sync()
        t1 = time.perf_counter()
        _step(trainer, x).item()
        step_s += time.perf_counter() - t1
        data_s += t1 - t0
    return {"data_s": round(data_s, 4), "step_s": round(step_s, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the embedded sample, 2 timed epochs")
    p.add_argument("--dataset", choices=["sample", "fashion_mnist", "mnist"],
                   help="default: fashion_mnist from ../shared/data if present, else sample; "
                        "sample with --quick")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--epochs", type=int, help="timed epochs per side (default 3, 2 --quick)")
    p.add_argument("--workers", default=None,
                   help="DataLoader num_workers to try, comma-separated (default 0,2; "
                        "0 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a cpu:1 trial)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    started, info = common.now(), common.machine()
    epochs = args.epochs or (2 if args.quick else 3)
    workers = [int(w) for w in (args.workers or ("0" if args.quick else "0,2")).split(",")]

    import torch

    from cae.config.trial import TrialConfig
    from cae.data.datasets import load
    from cae.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    tmp = common.tempdir("datapath")
    dataset = args.dataset or ("sample" if args.quick else "fashion_mnist")
    data_dir = None
    if dataset != "sample":
        folder = DATASETS[dataset].folder
        root = common.writable_data_copy(folder, tmp)
        if root is None:
            if args.dataset:
                raise SystemExit(f"{dataset}: no {folder}/raw in ../shared/data")
            print(f"note: no {folder} in ../shared/data; using the embedded sample")
            dataset = "sample"
        else:
            data_dir = str(root)
    data_cfg = {"dataset": dataset, "data_dir": data_dir, "download": False,
                "train_limit": args.train_limit}
    cfg = TrialConfig.model_validate({
        "data": data_cfg, "task": {"name": "reconstruct"}, "model": MODEL, "lr": 0.003,
        "batch_size": args.batch_size, "max_epochs": 100, "patience": None, "seed": 0,
        "device": args.device})
    data = load(cfg.data)
    ours = Trainer(cfg, data)
    device = ours.device
    # The training split's indices into the dataset, as cae.data.datasets.split draws them.
    n_all = data.train.shape[0]
    n_val = min(max(1, round(n_all * cfg.data.val_fraction)), n_all - 1)
    train_idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(
        cfg.data.split_seed))[n_val:]
    ds, ds_kind = classic_dataset(dataset, data_dir, train_idx, data)
    n = len(ds)
    assert n == ours.splits.train.shape[0]
    classic = {w: (Trainer(cfg, data), torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, num_workers=w)) for w in workers}

    print(f"{dataset}: {n:,} training images, batch {args.batch_size}, device {device}, "
          f"{args.threads} thread(s); warm-up ...", flush=True)
    ours_epoch(ours)
    for tr, loader in classic.values():
        classic_epoch(tr, loader)
    times = {"ours": [], **{f"classic_w{w}": [] for w in workers}}
    for e in range(epochs):
        print(f"epoch {e + 1}/{epochs} ...", flush=True)
        times["ours"].append(ours_epoch(ours))
        for w, (tr, loader) in classic.items():
            times[f"classic_w{w}"].append(classic_epoch(tr, loader))
    ips = {k: n * len(v) / sum(v) for k, v in times.items()}
    best_classic = max((k for k in ips if k != "ours"), key=ips.get)
    ratio = ips["ours"] / ips[best_classic]
    breakdown = {"ours": breakdown_ours(ours)}
    for w, (tr, loader) in classic.items():
        breakdown[f"classic_w{w}"] = breakdown_classic(tr, loader)
    goal = 5.0 if device.type == "cuda" else 1.0
    figures = {
        "what": "training epoch only (no validation); ours = Trainer.train_epoch on device-"
                "resident uint8; classic = DataLoader(PIL + ToTensor, shuffle=True), "
                ".to(device) and loss.item() per step, the same model/optimiser/step",
        "dataset": dataset, "classic_dataset": ds_kind, "train_images": n, "model": MODEL,
        "batch_size": args.batch_size, "device": str(device), "threads": args.threads,
        "epochs_timed": epochs, "workers": workers,
        "images_per_s": {k: round(v, 1) for k, v in ips.items()},
        "epoch_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_per_variant": {k: round(ips["ours"] / v, 4) for k, v in ips.items()
                              if k != "ours"},
        "best_classic": best_classic, "ratio": round(ratio, 4),
        "goal": f">= {goal:g} ({device.type})", "met": ratio >= goal,
        "breakdown_one_epoch": breakdown,
    }
    out = args.out or common.results_path(
        "datapath", args.quick, "cuda" if device.type == "cuda" else None)
    common.write_results(out, "datapath", info, figures, started)
    shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for k, v in ips.items():
        b = breakdown[k]
        label = "ours (device-resident uint8)" if k == "ours" else \
            f"DataLoader+ToTensor, {k.removeprefix('classic_w')} workers"
        rows.append((label, v, ips["ours"] / v, b["data_s"], b["step_s"]))
    print()
    print(common.table(rows, header=("data path", "images/s", "ours / this",
                                     "data s/epoch", "step s/epoch")))
    print(f"\n{dataset} ({ds_kind}), {n:,} images x {epochs} timed epochs, batch "
          f"{args.batch_size}, {device}, {args.threads} thread(s)")
    print(f"goal >= {goal:g} on {device.type}: {'met' if ratio >= goal else 'NOT met'} "
          f"({ratio:.3f} against {best_classic})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

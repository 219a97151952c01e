"""How much memory one trial needs, estimated without torch, and how much it may use.

The dry run and ``cae sweep`` refuse, before Ray starts, a grid point whose trial cannot fit
its share of the device: a CPU trial's share of the machine's RAM (RAM x cpu per trial /
CPUs), a GPU trial's share of the card (card memory x gpu per trial). The estimate adds:

- parameters (fp32), their gradients, Adam's two moments and the best epoch's copy:
  5 x 4 bytes per parameter;
- activations of a training step: every layer's output at the batch size, kept for the
  backward pass, and as much again for their gradients at the peak of the backward pass
  (fp32, 2 x 4 bytes per element), plus the batch's input and target;
- the dataset on the trial's device: the uint8 images the trial receives, its train/val
  split copy, and the validation and test inputs and targets prepared once in float32;
- a fixed runtime (the Python process with torch and a Ray worker, or a CUDA context).

``benchmarks/memory.py`` checks it against the peak memory torch really used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cae.model import plan as arch

if TYPE_CHECKING:
    from cae.config.trial import ModelConfig, TrialConfig

# What a trial's process holds before its first tensor: Python with torch and cae imported
# (benchmarks/memory.py measures it; docs/performance.md has the figure), and room for a
# Ray worker's own libraries.
RUNTIME_BYTES = 768 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one trial needs, by what needs them."""

    weights: int
    activations: int
    data: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.data + self.runtime

    def __str__(self) -> str:
        mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        return (f"weights and optimiser {mib(self.weights)}, activations {mib(self.activations)}, "
                f"data {mib(self.data)}, runtime {mib(self.runtime)}")


def layer_outputs(cfg: ModelConfig) -> int:
    """Elements of every layer's output for one sample, summed over the whole network."""
    enc, dec = arch.layers(cfg)
    shape: tuple[int, ...] = (cfg.in_channels, cfg.image_size, cfg.image_size)
    total = 0
    for layer in (*enc, *dec):
        match layer:
            case arch.Conv(_, cout, k, s, p, transpose):
                w = shape[-1] if transpose else (shape[-1] - k + 2 * p) // s + 1
                shape = (cout, w, w)
            case arch.Linear(_, fout):
                shape = (fout,)
            case arch.Pool():
                shape = (shape[0], shape[1] // 2, shape[2] // 2)
            case arch.Upsample(size):
                shape = (shape[0], size, size)
            case arch.Flatten():
                shape = (math.prod(shape),)
            case arch.Unflatten(to):
                shape = to
            case arch.BatchNorm() | arch.Activation() | arch.Dropout():
                pass
            case _:
                raise TypeError(f"no memory rule for layer {layer!r}")
        total += math.prod(shape)
    return total


def estimate(cfg: TrialConfig) -> MemoryEstimate:
    """The memory one trial of ``cfg`` needs (see the module doc for what is counted)."""
    m = cfg.model
    params = arch.param_count(m)
    in_px = m.in_channels * m.image_size**2
    out_px = m.out_channels * m.image_size**2
    per_sample = 2 * 4 * layer_outputs(m) + 4 * (in_px + out_px)
    batch = max(cfg.batch_size * per_sample, cfg.eval_batch_size * per_sample // 2)
    info = cfg.data.info()  # the registry's, or what a user's files were found to hold
    n_train, n_test = cfg.data.sizes()
    n_val = max(1, round(n_train * cfg.data.val_fraction))
    raw = info.pixels * (2 * n_train + n_test)  # received uint8 images + the split copy
    prepared = 4 * (in_px + out_px) * (n_val + n_test)  # val and test inputs and targets
    return MemoryEstimate(weights=5 * 4 * params, activations=batch, data=raw + prepared)


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def trial_budget(cpu: float, gpu: float) -> tuple[int, str] | None:
    """The bytes one trial may use on this machine, and what they are a share of; None
    for a GPU trial when this machine has no GPU to ask (a sweep planned for a cluster)."""
    if gpu > 0:
        import torch

        if not torch.cuda.is_available():
            return None
        card = torch.cuda.get_device_properties(0).total_memory
        share = min(gpu, 1.0)
        return int(card * share), f"{share:g} of a {card / 2**30:.0f} GiB GPU"
    ncpu = os.cpu_count() or 1
    share = min(cpu / ncpu, 1.0)
    ram = machine_memory()
    return int(ram * share), f"{cpu:g} of {ncpu} CPUs' share of {ram / 2**30:.0f} GiB RAM"

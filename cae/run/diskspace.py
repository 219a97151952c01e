"""Room on the storage: what a sweep will write, checked before it starts; a full disk
noticed when it happens.

Per trial, the run directory holds its checkpoints (Ray Tune keeps ``CHECKPOINTS_KEPT``;
each is ``state.pt`` with the weights, Adam's two moments and the best epoch's copy, plus
``history.json``), and Tune's per-epoch logs (``result.json``,
``progress.csv``, an event file). The run adds Tune's state (and cae's copy of it), the
tables and the report. ``estimate`` adds these up from the dry run's architectures, with
the per-file sizes measured on real runs (see ``cae sweep --dry-run``).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cae.config.errors import UserError
from cae.model import plan as arch

if TYPE_CHECKING:
    from cae.config.trial import TrialConfig

# What a sweep writes besides its checkpoints' tensors, each rounded up from the files of
# real sweeps (the quickstart's and Study B's): Tune's logs per epoch (result.json,
# progress.csv, events file) and per trial (params, record, error), torch's overhead per
# saved tensor, the state files per trial, and the report. Too high errs on the safe side:
# it refuses a sweep that would have fitted, never starts one that fills the disk.
LOG_BYTES_PER_EPOCH = 6 * 1024
TRIAL_FILES_BYTES = 16 * 1024
TENSOR_OVERHEAD_BYTES = 1024
STATE_BYTES_PER_TRIAL = 24 * 1024
REPORT_BYTES = 8 * 2**20
CHECKPOINTS_KEPT = 2  # Ray Tune's CheckpointConfig(num_to_keep) of every sweep
FULL_ERRNO = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


class StorageFull(UserError):
    """The run directory's filesystem has no room left for what the sweep writes."""


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a sweep writes to its storage."""

    checkpoints: int
    logs: int
    run: int

    @property
    def total(self) -> int:
        return self.checkpoints + self.logs + self.run

    def __str__(self) -> str:
        return (f"{mib(self.total)} (checkpoints {mib(self.checkpoints)}, logs "
                f"{mib(self.logs)}, state, tables and report {mib(self.run)})")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def checkpoint_bytes(cfg: TrialConfig) -> int:
    """One checkpoint of a trial: fp32 weights, Adam's two moments and the best epoch's
    copy (4 x 4 bytes per parameter), torch's per-tensor overhead, and its history."""
    params = arch.param_count(cfg.model)
    enc, dec = arch.layers(cfg.model)
    tensors = sum(2 for layer in (*enc, *dec) if layer.params)  # weight and bias each
    return 16 * params + 4 * tensors * TENSOR_OVERHEAD_BYTES + 512 * cfg.max_epochs


def estimate(configs: list[tuple[TrialConfig, int]], fused: bool = False) -> DiskEstimate:
    """What a sweep writes, for each distinct configuration and its number of trials; a
    ``fused`` sweep keeps each pack's stacked state beside its members' own checkpoints."""
    checkpoints = logs = run = 0
    copies = CHECKPOINTS_KEPT * (2 if fused else 1)
    for cfg, n in configs:
        checkpoints += n * copies * checkpoint_bytes(cfg)
        logs += n * (LOG_BYTES_PER_EPOCH * cfg.max_epochs + TRIAL_FILES_BYTES)
        run += n * 2 * STATE_BYTES_PER_TRIAL
    return DiskEstimate(checkpoints, logs, run + REPORT_BYTES)


def free_bytes(path: str | Path) -> int:
    """Free bytes of the filesystem ``path`` is (or will be) on."""
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_room(storage: str, need: DiskEstimate) -> None:
    """Refuse a local storage location with less free space than the sweep will write."""
    free = free_bytes(storage)
    if free < need.total:
        raise StorageFull(
            f"storage: {storage} has {mib(free)} free, and this sweep writes about {need}; "
            "free some space, give another --storage, or sweep fewer trials")


def is_full_error(text: str | BaseException) -> bool:
    """Whether an exception (or its text, an error file's) says the disk is full."""
    if isinstance(text, OSError) and text.errno in FULL_ERRNO:
        return True
    return any(marker in str(text) for marker in FULL_TEXT)

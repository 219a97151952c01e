"""A trial's checkpoints in its run directory (a local path or a URI): which there are,
and the newest one that can be read whole.

Each checkpoint is a folder ``checkpoint_NNNNNN`` that Ray Tune copies into the trial's
directory; it holds ``state.pt`` (weights, optimiser, early-stopping and random state; see
``cae.train.trainer.Trainer.state_dict``) and ``history.json`` (the trial's epochs so far and, once
it has ended, its final report; see ``cae.sweep.trainable``). A copy cut short (a full disk, a
node lost mid-upload) is skipped for the one before it, and the caller says so. Torch is
imported only to read ``state.pt``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
PREFIX = "checkpoint_"


def filesystem(location: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local path or a URI."""
    import pyarrow.fs as pafs

    text = str(location)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def list_checkpoints(fs: Any, trial_path: str) -> list[str]:
    """The trial's checkpoint folders, newest first."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith(PREFIX)), reverse=True)
    return [f"{trial_path.rstrip('/')}/{n}" for n in names]


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_history(fs: Any, checkpoint: str) -> dict | None:
    """A checkpoint's ``history.json``, or None if it is missing or not whole."""
    try:
        data = json.loads(_read(fs, f"{checkpoint}/{HISTORY_FILE}"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def newest_history(trial_dir: str | Path) -> dict:
    """The whole ``history.json`` with the most epochs among the trial's checkpoints; {} if
    none is whole."""
    return _newest_history(*filesystem(trial_dir))


def _newest_history(fs: Any, path: str) -> dict:
    found = [h for c in list_checkpoints(fs, path) if (h := read_history(fs, c)) is not None]
    return max(found, key=epoch_of, default={})


@dataclass
class Found:
    """The newest readable checkpoint: its folder, its state and history, and the newer
    ones that could not be read (``"checkpoint_000007: why"``)."""

    path: str
    state: dict
    history: dict
    skipped: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def epoch_of(history: dict) -> int:
    """The last epoch a checkpoint's history holds (0 for none)."""
    epochs = history.get("epochs") or []
    return int(epochs[-1].get("epoch", len(epochs))) if epochs else 0


def load(fs: Any, checkpoint: str) -> Found | None:
    """The checkpoint in folder ``checkpoint`` if its ``state.pt`` and ``history.json`` are
    both whole, else None."""
    history = read_history(fs, checkpoint)
    if history is None:
        return None
    import torch

    try:
        state = torch.load(io.BytesIO(_read(fs, f"{checkpoint}/{STATE_FILE}")),
                           weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - torn, missing or not a torch file
        return None
    return Found(checkpoint, state, history)


def load_newest(fs: Any, trial_path: str) -> Found | None:
    """Load the checkpoint with the most epochs whose ``state.pt`` and ``history.json`` are
    both whole; None when the trial has none. (By epochs, not by name: after a restore from
    an older state Tune may number a new checkpoint below one it did not know of.)"""
    import torch

    skipped, candidates = [], []
    for checkpoint in list_checkpoints(fs, trial_path):
        history = read_history(fs, checkpoint)
        if history is None:
            skipped.append(f"{checkpoint.rsplit('/', 1)[-1]}: no whole {HISTORY_FILE}")
        else:
            candidates.append((epoch_of(history), checkpoint, history))
    for _, checkpoint, history in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            state = torch.load(io.BytesIO(_read(fs, f"{checkpoint}/{STATE_FILE}")),
                               weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torn, missing or not a torch file: skip it
            skipped.append(f"{checkpoint.rsplit('/', 1)[-1]}: {STATE_FILE} unreadable "
                           f"({type(exc).__name__})")
            continue
        return Found(checkpoint, state, history, skipped)
    return None


# ---- checkpoints of an earlier cae -------------------------------------------------------

DROPOUT_KEYS = ("dropout", "dense_dropout", "edge_dropout")


def drew_global_dropout(state: dict) -> bool:
    """Whether a trial's checkpoint comes from a cae that drew a plain trial's dropout masks
    from torch's global generator: one that saved that generator's state (``rng``) and had
    no learning-rate schedules yet (no ``schedule``; cae before 2026-12-06). Since then
    every trial draws them from its own seed (``cae.train.stacked.MaskedDropout``)."""
    return "rng" in state and "schedule" not in state and "pack" not in state


def old_dropout_trials(run_dir: str) -> list[str]:
    """The trials of a run, alone (not a pack's members) and not ended, whose model has
    dropout and whose newest checkpoint :func:`drew_global_dropout`: resumed, they draw
    other masks than the cae that made them would have."""
    import pyarrow.fs as pafs

    fs, root = filesystem(run_dir)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("run_trial"):
            continue
        try:
            model = json.loads(_read(fs, f"{info.path}/trial.json"))["config"]["model"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not any(float(model.get(k) or 0) > 0 for k in DROPOUT_KEYS):
            continue
        if _newest_history(fs, info.path).get("final"):
            continue  # ended: nothing to resume, its state not worth loading
        found = load_newest(fs, info.path)
        if found is not None and not found.state.get("final") and \
                drew_global_dropout(found.state):
            out.append(info.base_name)
    return sorted(out)

"""A fused pack's files in a run directory, read as one trial per member (torch-free).

A pack is one Ray Tune trial (``cae.sweep.packtrial``): its directory holds Tune's files for the
pack (``params.json`` is ``{"pack": [point, ...]}``) and the pack's own checkpoints (for
its exact resume), and one folder per member, ``member_NN``, laid out like a trial's
directory: ``params.json`` (its search-space point), ``trial.json`` (its record) and
``checkpoint_NNNNNN/`` with ``state.pt`` (``Trainer``'s format: it loads into a plain CAE)
and ``history.json`` (its epochs, and its final report once it has stopped). So the tables
have a row per member, named ``<pack dir>/member_NN`` in ``trial_dir``, and the report's
pictures and ``cae export`` read a member as they read any trial.
"""

from __future__ import annotations

import json
from pathlib import Path

from cae.run.tunefiles import TrialState

PACK_KEY = "pack"
MEMBER_PREFIX = "member_"


def member_name(index: int) -> str:
    return f"{MEMBER_PREFIX}{index:02d}"


def is_pack_point(point: dict) -> bool:
    """Whether a Tune trial's ``params.json`` is a fused pack's."""
    return isinstance(point, dict) and isinstance(point.get(PACK_KEY), list)


def members(trial_dir: Path) -> list[tuple[Path, dict]]:
    """Each member's folder in a pack's directory with its search-space point, also for
    members whose pack has not started yet (the folder does not exist then); [] for an
    ordinary trial's directory."""
    try:
        point = json.loads((trial_dir / "params.json").read_text())
    except (OSError, ValueError):
        return []
    if not is_pack_point(point):
        return []
    return [(trial_dir / member_name(i), p) for i, p in enumerate(point[PACK_KEY])]


def member_state(name: str, history: dict, pack: TrialState | None) -> tuple[TrialState, str]:
    """A member's status and error from its own history and its pack's Tune state: a member
    that stopped is TERMINATED (ERROR if it diverged) whatever its pack does; until then it
    shares its pack's status."""
    final = history.get("final") or {}
    static = history.get("static") or {}
    trial_id = static.get("trial_id") or name
    failures = pack.num_failures if pack else 0
    if final.get("error"):
        return TrialState("ERROR", trial_id, failures), str(final["error"])
    if final:
        return TrialState("TERMINATED", trial_id, failures), ""
    status = pack.status if pack else "UNKNOWN"
    return TrialState(status, trial_id, failures), ""

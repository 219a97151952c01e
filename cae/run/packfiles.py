"""A fused pack's files in a run directory, read as one trial per member (torch-free).

A pack is one Ray Tune trial (``cae.sweep.trainable``): its directory holds Tune's files for the
pack (``params.json`` is ``{"pack": [point, ...]}``; a run made before packs left their
checkpoints to their members also has the pack's own) and one folder per member,
``member_NN``, laid out like a trial's directory: ``params.json`` (its search-space point),
``trial.json`` (its record) and ``checkpoint_NNNNNN/`` with ``state.pt`` (``Trainer``'s
format: it loads into a plain CAE, and a pack resumes from its members') and
``history.json`` (its epochs, each with the ``pack`` that trained it, and its final report
once it has stopped). So the tables have a row per member, named ``<pack dir>/member_NN`` in
``trial_dir``, and the report's pictures and ``cae export`` read a member as they read any
trial. Under successive halving a member goes on in later packs formed from the survivors
of a rung (``params.json`` then also names their folders, ``homes``): it keeps its folder,
and the newest pack that holds it gives its status until it ends.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cae.run.tunefiles import TrialState, last_error

PACK_KEY = "pack"
# A pack formed from members that trained in earlier packs (successive halving) names their
# folders (relative to the run directory) and the epoch they are at.
HOMES_KEY, EPOCH_KEY = "homes", "epoch"
MEMBER_PREFIX = "member_"
# In a member's folder once successive halving has stopped it (written by the driver).
STOPPED_FILE = "stopped.json"


def member_name(index: int) -> str:
    return f"{MEMBER_PREFIX}{index:02d}"


def is_pack_point(point: dict) -> bool:
    """Whether a Tune trial's ``params.json`` is a fused pack's."""
    return isinstance(point, dict) and isinstance(point.get(PACK_KEY), list)


def _point(trial_dir: Path) -> dict:
    try:
        return json.loads((trial_dir / "params.json").read_text())
    except (OSError, ValueError):
        return {}


def regrouped(trial_dir: Path) -> bool:
    """Whether a Tune trial's directory is a pack formed from members of earlier packs
    (its members' files are in their own folders)."""
    point = _point(trial_dir)
    return is_pack_point(point) and bool(point.get(HOMES_KEY))


def members(trial_dir: Path) -> list[tuple[Path, dict]]:
    """Each member's folder in a pack's directory with its search-space point, also for
    members whose pack has not started yet (the folder does not exist then); [] for an
    ordinary trial's directory."""
    point = _point(trial_dir)
    if not is_pack_point(point) or point.get(HOMES_KEY):  # the latter's are read where they live
        return []
    return [(trial_dir / member_name(i), p) for i, p in enumerate(point[PACK_KEY])]


def member_state(name: str, history: dict, pack: TrialState | None,
                 stopped: dict | None = None, halving: bool = False) -> tuple[TrialState, str]:
    """A member's status and error from its own history, its stop mark (``stopped``: the
    halving stopped it) and the Tune state of the newest pack that holds it: a member that
    stopped is TERMINATED (ERROR if it diverged) whatever its pack does; until then it
    shares its pack's status, but under halving (``halving``) a member whose pack ended
    without it waits (PAUSED) for its rung or for its next pack."""
    final = history.get("final") or {}
    static = history.get("static") or {}
    trial_id = static.get("trial_id") or name
    failures = pack.num_failures if pack else 0
    if final.get("error"):
        return TrialState("ERROR", trial_id, failures), str(final["error"])
    if final or stopped is not None:
        return TrialState("TERMINATED", trial_id, failures), ""
    status = pack.status if pack else "UNKNOWN"
    if halving and status == "TERMINATED":
        status = "PAUSED"
    return TrialState(status, trial_id, failures), ""


def holders(run_dir: Path, tune: dict[str, TrialState] | None = None) -> dict[str, list[str]]:
    """Each member folder (``<pack dir>/member_NN``) that later packs train (halving: the
    survivors of a rung regrouped; a pack formed again after its pack failed) -> those
    packs' directory names, oldest first, from the packs' ``params.json`` and from Tune's
    state (``tune``: a pack that failed as it started has no files but its error)."""
    later = {name: list(state.homes) for name, state in (tune or {}).items() if state.homes}
    for p in run_dir.iterdir():
        point = _point(p)
        if is_pack_point(point) and point.get(HOMES_KEY):
            later[p.name] = point[HOMES_KEY]
    out: dict[str, list[str]] = {}
    for name in sorted(later, key=_created):
        for home in later[name]:
            out.setdefault(home, []).append(name)
    return out


def _created(name: str) -> tuple:
    """The order Tune created a trial in, from its directory's name
    (``<trainable>_<trial id>_<counter>_...``)."""
    match = re.search(r"_[0-9a-f]{8}_(\d+)_", name)
    return (int(match.group(1)) if match else 0, name)


def read_stopped(folder: Path) -> dict | None:
    """A member's stop mark (``STOPPED_FILE``), or None."""
    try:
        return json.loads((folder / STOPPED_FILE).read_text())
    except (OSError, ValueError):
        return None


def trial_state(run_dir: Path, name: str, history: dict, error: str,
                tune: dict[str, TrialState], later: dict[str, list[str]], halving: bool
                ) -> tuple[TrialState | None, str]:
    """A trial's status and error (``error``: from its ``error.txt``): Tune's (``tune``, by
    directory name), where a trial that diverged (its final report says so; it ends without
    failing) is an error; for a fused pack's member (``<pack dir>/member_NN``) its own end,
    its stop mark, else the status of the newest pack holding it (``later``: ``holders``),
    with the failures of every pack that held it."""
    final = history.get("final") or {}
    if "/" not in name:  # a trial alone
        state = tune.get(name)
        if final.get("error") and state is not None:
            return TrialState("ERROR", state.trial_id, state.num_failures), str(final["error"])
        return state, error
    packs = [name.split("/", 1)[0], *later.get(name, [])]
    state, error = member_state(name, history, tune.get(packs[-1]),
                                read_stopped(run_dir / name), halving)
    failures = sum(tune[p].num_failures for p in packs if p in tune)
    state = TrialState(state.status, state.trial_id, failures)
    if state.status == "ERROR" and not error:  # the pack failed before it ended
        error = last_error(run_dir / packs[-1])
    return state, error

"""Ray Tune's state of a run: read whole or not at all, a last good copy kept, repaired
before a resume.

Tune keeps each trial's status and its searcher's progress in state files at the top of the
run directory (``cae.run.tunefiles.STATE_FILES``), rewritten every few seconds and not
atomically: a full disk or a driver killed mid-copy leaves the newest one cut short. So:

- readers (``cae.results.tables``) take the newest state file that parses, else the last good copy
  cae keeps in ``.cae-state/``, else no statuses at all (each trial's own files then say
  whether it ended), with a note saying which;
- while a sweep runs, the driver copies the newest state (every file of its session) into
  ``.cae-state/`` whenever every file of it is whole, none was written in the last second
  and it has changed (``keep_copy``): Tune copies the files from its staging folder one by
  one (several at once), so a state read while it copies can mix two moments, a searcher
  ahead of or behind the trials it handed out;
- before ``cae resume``, ``repair`` sets a torn session's files aside (``*.torn``: any of
  them cut short, the searcher's pickle as much as the experiment state) and puts
  the last good copy in their place, so that ``Tuner.restore`` reads a whole state; trials
  created after that copy (their directories exist, the copy does not know them) are the
  ``orphans``, which the resumed trials with the same search-space point take over.
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from cae.run.directory import write_file
from cae.run.tunefiles import (
    EXPERIMENT_STATE,
    STATE_FILES,
    StateFormatError,
    TrialState,
    read_experiment_state,
)

COPY_DIR = ".cae-state"
TORN_SUFFIX = ".torn"
QUIET_S = 1.0  # a state is copied once its files have not been written for this long


@dataclass
class Statuses:
    """Trial directory name -> its state, and where they came from."""

    trials: dict[str, TrialState] = field(default_factory=dict)
    source: Path | None = None
    note: str | None = None  # set when the newest state could not be read


def _sessions(folder: Path) -> list[Path]:
    """Experiment-state files in ``folder``, newest session first."""
    return sorted(folder.glob(EXPERIMENT_STATE.format("*")), reverse=True)


def _parse(path: Path) -> tuple[dict[str, TrialState], float | None] | None:
    try:
        return read_experiment_state(path.read_text())
    except (OSError, StateFormatError, UnicodeDecodeError):
        return None


def read_statuses(run_dir: Path) -> Statuses:
    """The statuses of the newest state that can be read whole (see the module doc)."""
    newest = _sessions(run_dir)
    for i, path in enumerate(newest + _sessions(run_dir / COPY_DIR)):
        parsed = _parse(path)
        if parsed is None:
            continue
        note = None
        if i > 0 and newest:
            where = "cae's last good copy" if i >= len(newest) else "an older session's state"
            note = (f"{newest[0].name} could not be read; trial statuses are from {where} "
                    f"({path.name}, {_age(newest[0], path)})")
        elif i == 0 and (torn := torn_files(run_dir)):
            note = (f"{' and '.join(torn)} could not be read (cut short); cae resume sets "
                    "this session's state aside and goes on from cae's last good copy")
        return Statuses(parsed[0], source=path, note=note)
    note = None
    if newest:
        note = (f"{newest[0].name} could not be read and there is no earlier state; each "
                "trial's status comes from its own files")
    return Statuses(note=note)


def first_start(run_dir: Path) -> float | None:
    """When the sweep first started: the start time of the oldest session whose state can
    be read (each ``cae resume`` is a session of its own, with its own start)."""
    for path in reversed(_sessions(run_dir)):
        parsed = _parse(path)
        if parsed is not None and parsed[1] is not None:
            return parsed[1]
    return None


def _age(newer: Path, older: Path) -> str:
    try:
        seconds = max(0.0, newer.stat().st_mtime - older.stat().st_mtime)
    except OSError:
        return "age unknown"
    return f"{seconds:.0f} s older"


def _whole(path: Path) -> bool:
    """Whether one of Tune's state files is whole (see ``_whole_bytes``)."""
    try:
        return _whole_bytes(path.name, path.read_bytes())
    except OSError:
        return False


def _whole_bytes(name: str, data: bytes) -> bool:
    """Whether the bytes of Tune's state file ``name`` are whole: the experiment state as
    Tune's JSON, the others (pickles, whatever their suffix says) when their opcodes run to
    the pickle's STOP, walked with ``pickletools`` so that nothing is imported or built (a
    reader without Ray can judge a searcher's state), or else when they parse as JSON."""
    if name.startswith("experiment_state-"):
        try:
            read_experiment_state(data.decode())
            return True
        except (StateFormatError, UnicodeDecodeError):
            return False
    try:
        for _ in pickletools.genops(data):
            pass
        return bool(data)
    except ValueError:
        pass
    try:
        json.loads(data)
        return True
    except ValueError:  # UnicodeDecodeError included
        return False


def torn_files(run_dir: Path) -> list[str]:
    """The names of the newest session's state files that are not whole."""
    sessions = _sessions(run_dir)
    if not sessions:
        return []
    return [p.name for p in _session_files(run_dir, _session_of(sessions[0])) if not _whole(p)]


def _session_whole(folder: Path, session: str) -> bool:
    return all(_whole(p) for p in _session_files(folder, session))


def _session_of(path: Path) -> str:
    return path.name[len("experiment_state-"):-len(".json")]


def _session_files(folder: Path, session: str) -> list[Path]:
    return [folder / t.format(session) for t in STATE_FILES if (folder / t.format(session))
            .is_file()]


def _stamps(paths: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for path in paths:
        st = path.stat()
        out.append((path.name, st.st_mtime_ns, st.st_size))
    return out


def keep_copy(run_dir: Path, quiet: float = QUIET_S) -> bool | None:
    """Copy the newest session's state files into ``.cae-state/`` if every one of them is
    whole, none changed in the last ``quiet`` seconds or while they were read, and they
    differ from the copy there. Returns whether it copied, None when there is no whole,
    settled state to copy now (try again later). Local runs only (at a URI each file is
    written whole)."""
    sessions = _sessions(run_dir)
    if not sessions:
        return None
    session = _session_of(sessions[0])
    paths = _session_files(run_dir, session)
    try:
        before = _stamps(paths)
        if time.time() - max(ns for _, ns, _ in before) / 1e9 < quiet:
            return None  # Tune may be copying them now: another moment would be mixed in
        files = {p.name: p.read_bytes() for p in paths}
        if _stamps(paths) != before or not all(_whole_bytes(n, d) for n, d in files.items()):
            return None
    except FileNotFoundError:  # replaced while read
        return None
    copy_dir = run_dir / COPY_DIR
    if files == {p.name: p.read_bytes() for p in _session_files(copy_dir, session)}:
        return False
    for name, data in files.items():
        write_file(copy_dir, name, data)  # the bytes judged whole, each file written whole
    return True


def repair(run_dir: Path) -> str | None:
    """Before a resume: if any state file of the newest session cannot be read whole, set
    the session's files aside (``*.torn``) and put cae's last good copy of that session in
    their place (or leave Tune the older sessions). Returns what was done, or None if
    nothing was."""
    torn = torn_files(run_dir)
    if not torn:
        return None
    sessions = _sessions(run_dir)
    session = _session_of(sessions[0])
    for path in _session_files(run_dir, session):
        os.replace(path, path.with_name(path.name + TORN_SUFFIX))
    what = f"{' and '.join(torn)} could not be read (cut short)"
    copy_dir = run_dir / COPY_DIR
    kept = copy_dir / sessions[0].name
    if kept.is_file() and _session_whole(copy_dir, session):
        for path in _session_files(copy_dir, session):
            shutil.copyfile(path, run_dir / path.name)
        return (f"{what}; session {session} set aside ({TORN_SUFFIX}), the run goes on from "
                f"cae's last good copy of it "
                f"({_age(sessions[0].with_name(sessions[0].name + TORN_SUFFIX), kept)})")
    older = [p for p in sessions[1:] if _session_whole(run_dir, _session_of(p))]
    if older:
        return (f"{what}; session {session} set aside, the run goes on from the previous "
                f"session's state {older[0].name}")
    return (f"{what} and there is no earlier state; session {session} set aside: the sweep "
            "starts again, each trial going on from its own checkpoints")


def orphans(run_dir: Path, known: set[str]) -> dict[str, str]:
    """Trial directories the restored state does not know, by their search-space point
    (``params.json`` as canonical JSON) -> directory name."""
    out = {}
    for params in sorted(run_dir.glob("*/params.json")):
        name = params.parent.name
        if name in known or name.startswith("."):
            continue
        try:
            point = json.loads(params.read_text())
        except (OSError, ValueError):
            continue
        out[point_key(point)] = name
    return out


def point_key(point: dict) -> str:
    """A search-space point as canonical JSON: the identity of a trial across restarts."""
    return json.dumps(point, sort_keys=True, default=str)


"""A run directory, local or at a URI (s3://, gs://, file://): its spec, files written
whole, its local mirror, and publishing files into it.

A run directory holds Ray Tune's own files (experiment state, one folder per trial with
``params.json``, ``result.json`` and checkpoints), plus ours: the resolved ``spec.yaml``
(where the data came from included), ``trials.parquet``, ``epochs.parquet``,
``baselines.parquet`` and ``report.html``. One at a URI is read through a local mirror of
its small files (``fetch_run``; checkpoints only for the few trials the report draws:
``fetch_checkpoints``), and what is made from it goes back next to them (``publish``).
"""

from __future__ import annotations

import os
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cae.config.errors import UserError, validate
from cae.config.spec import SweepSpec
from cae.run import checkpoints
from cae.run.diskspace import CHECKPOINTS_KEPT
from cae.run.packfiles import MEMBER_PREFIX
from cae.run.record import RECORD_FILE
from cae.run.tunefiles import STATE_FILES

SPEC_FILE = "spec.yaml"
BASELINES_FILE = "baselines.parquet"  # the reference errors (cae.results.baselines)


class RunDirError(UserError):
    """A path or URI that is not a readable cae run directory."""


class NotARun(RunDirError):
    """A path or URI without a run's ``spec.yaml``: not a cae run directory (every reader
    of a run says so in these words)."""

    def __init__(self, run_dir: str | Path):
        super().__init__(f"{run_dir} is not a cae run directory (no {SPEC_FILE} in it)")


def is_uri(storage: str) -> bool:
    """s3://, gs://, file://, ...: a location read through pyarrow's filesystems."""
    return "://" in storage


def is_shared_uri(storage: str) -> bool:
    """A URI that every node reaches alike (``file://`` is a local path in disguise)."""
    return is_uri(storage) and not storage.startswith("file://")


def local_path(storage: str) -> Path:
    return Path(storage.removeprefix("file://")).expanduser().resolve()


def storage_uri(storage: str) -> str:
    """Ray wants an absolute local path or a URI."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def run_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _filesystem(run_dir: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(run_dir)
    except (OSError, ValueError) as exc:  # unknown scheme, unreachable bucket
        raise RunDirError(f"{run_dir}: cannot be reached ({exc})") from None


# ---- the spec ------------------------------------------------------------------------------


def write_file(location: str | Path, name: str, data: bytes) -> None:
    """Write ``location/name`` whole: locally to a temporary name, then renamed over it (a
    reader never sees half a file, a crash leaves the old one); at a URI as one object (each
    object is replaced whole). The folder is made if needed."""
    text = str(location)
    if is_uri(text):
        fs, path = _filesystem(text)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path.rstrip('/')}/{name}") as f:
            f.write(data)
        return
    folder = Path(text)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)


def save_spec(run_dir: str, spec: SweepSpec) -> None:
    """Write the resolved spec beside Ray Tune's files (local dirs or any pyarrow URI)."""
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    write_file(run_dir, SPEC_FILE, text.encode())


def _spec_data(run_dir: str | Path) -> Any:
    """``spec.yaml`` of a run directory (a local path or a URI) as YAML reads it."""
    import pyarrow.fs as pafs

    text_dir = str(run_dir)
    if is_uri(text_dir):
        fs, path = _filesystem(text_dir)
        if fs.get_file_info(f"{path}/{SPEC_FILE}").type != pafs.FileType.File:
            raise NotARun(run_dir)
        with fs.open_input_stream(f"{path}/{SPEC_FILE}") as f:
            text = f.read().decode()
    else:
        path = Path(run_dir) / SPEC_FILE
        if not path.is_file():
            raise NotARun(run_dir)
        text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RunDirError(f"{run_dir}/{SPEC_FILE} is not valid YAML: {exc}") from None


def read_spec(run_dir: str | Path) -> dict:
    """The spec a run directory holds, as the plain mapping written into ``spec.yaml``
    (not validated: what the readers of a finished run take, so that a run opens whatever
    this cae's defaults and checks have become since); :func:`load_run_spec` validates it."""
    data = _spec_data(run_dir)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunDirError(f"{run_dir}/{SPEC_FILE} holds {type(data).__name__}, not the "
                          "mapping of a sweep spec")
    return data


def load_run_spec(run_dir: str) -> SweepSpec:
    """The spec a run directory (a local path or a URI) ran with, validated."""
    return validate(SweepSpec, _spec_data(run_dir), f"{run_dir}/{SPEC_FILE}")


# ---- mirrors of run directories at URIs ------------------------------------------------------

_TOP_FILES = re.compile("|".join(
    [re.escape(SPEC_FILE), re.escape(BASELINES_FILE)]
    + [re.escape(f).replace(r"\{\}", ".*") for f in STATE_FILES]))
_TRIAL_FILES = ("params.json", "result.json", "error.txt", RECORD_FILE)


def mirror_dir(run_dir: str) -> Path:
    """Where the local mirror of a URI run directory lives (a per-user cache)."""
    from platformdirs import user_cache_dir

    scheme, rest = run_dir.split("://", 1)
    parts = [p for p in rest.split("?", 1)[0].split("/") if p not in ("", ".", "..")]
    return Path(user_cache_dir("cae-sweep")).joinpath("runs", scheme, *parts)


def fetch_run(run_dir: str, dest: Path | None = None) -> Path:
    """Copy what cae.results.tables reads from a run directory at a URI (s3://, gs://, ...) into a
    local mirror, refreshed on every call; returns the mirror's path."""
    try:
        return _fetch_run(run_dir, dest)
    except OSError as exc:  # the bucket or path cannot be listed or read
        raise RunDirError(f"{run_dir}: cannot be read ({exc})") from None


def _fetch_run(run_dir: str, dest: Path | None) -> Path:
    import shutil

    import pyarrow.fs as pafs

    fs, root = _filesystem(run_dir)
    root = root.rstrip("/")
    dest = dest or mirror_dir(run_dir)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root):].lstrip("/").split("/")
        if len(rel) > 2 and rel[1].startswith(MEMBER_PREFIX):  # a fused pack's member: a trial
            rel = [f"{rel[0]}/{rel[1]}", *rel[2:]]
        wanted = ((len(rel) == 1 and _TOP_FILES.fullmatch(rel[0]))
                  or (len(rel) == 2 and rel[1] in _TRIAL_FILES)
                  or (len(rel) == 3 and rel[1].startswith(checkpoints.PREFIX)
                      and rel[2] == checkpoints.HISTORY_FILE))
        if wanted:
            target = dest.joinpath(*rel)  # a member's "pack/member_NN" is two folders
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src:
                target.write_bytes(src.read())
    if not (dest / SPEC_FILE).is_file():
        raise NotARun(run_dir)
    return dest


def local_copy(run_dir: str) -> Path:
    """A local path to read a run directory from: itself, or the refreshed mirror of a URI."""
    if is_uri(run_dir):
        return fetch_run(run_dir)
    path = Path(run_dir)
    if not (path / SPEC_FILE).is_file():
        raise NotARun(run_dir)
    return path


def fetch_checkpoints(run_dir: str, trial_dirs, dest: Path | None = None) -> None:
    """Add the checkpoints of each named trial directory to the local mirror (the report's
    sample pictures rebuild the best trials from them): its newest ``CHECKPOINTS_KEPT`` in
    ``checkpoints.load_newest``'s order, so that loading from the mirror falls back past a
    torn copy as it does from the run."""
    fs, root = _filesystem(run_dir)
    root = root.rstrip("/")
    dest = dest or mirror_dir(run_dir)
    for name in trial_dirs:
        for src in _by_epochs(fs, f"{root}/{name}")[:CHECKPOINTS_KEPT]:
            _copy_folder(fs, src, dest / name / src.rsplit("/", 1)[-1])


def _by_epochs(fs, trial_path: str) -> list[str]:
    """A trial's checkpoints whose ``history.json`` is whole, most epochs first (ties: the
    newer name), as ``checkpoints.load_newest`` tries them."""
    found = [(checkpoints.epoch_of(history), path)
             for path in checkpoints.list_checkpoints(fs, trial_path)
             if (history := checkpoints.read_history(fs, path)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def _copy_folder(fs, src: str, target: Path) -> None:
    """Copy the folder ``src`` of ``fs`` (with its subfolders) to the local ``target``."""
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            path = target / info.path[len(src):].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                path.write_bytes(f.read())


def publish(run_dir: str, *files: Path) -> None:
    """Put local files (trials.parquet, the report, ...) into a run directory at a URI;
    a local run directory already holds them."""
    if not is_uri(run_dir):
        return
    fs, root = _filesystem(run_dir)
    for path in files:
        with fs.open_output_stream(f"{root.rstrip('/')}/{Path(path).name}") as out:
            out.write(Path(path).read_bytes())

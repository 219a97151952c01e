"""What W&B has written of a sweep's runs, read from its own files: each run's history rows
(step and values), its summary, and whether it ended.

W&B's service (``wandb-core``, shipped in the ``wandb`` package as ``wandb/bin/wandb-core``)
writes every record of a run to ``run-<id>.wandb`` in the run's folder
(``wandb/offline-run-<time>-<id>[-N]``, or ``run-...`` online), and ``wandb sync`` uploads
that file: what a run holds is what its files hold. The ``wandb`` package ships no Python
reader of them (``wandb/sdk/internal/datastore.py`` is not in it); the format is that of the
service's writer, a copy of LevelDB-Go's record log (``core/pkg/leveldb/
record.go`` in wandb/wandb, opened with ``CRCAlgoIEEE`` and the W&B header as its first
bytes), checked here against files the installed ``wandb`` writes:

- a 7-byte header, ``:W&B``, magic 0xBEE1 (uint16, little-endian) and version 0, at the
  start of the first block;
- then 32 KiB blocks of chunks, each a 7-byte chunk header (CRC-32 of the chunk's type byte
  and payload, IEEE as ``zlib.crc32``, uint32; the payload's length, uint16; its type, one
  byte: FULL, FIRST, MIDDLE or LAST) and its payload; a chunk never crosses a block, and a
  block's last bytes, too few for a chunk header, are zero;
- a record is one FULL chunk or a FIRST, MIDDLE..., LAST run of chunks; its bytes are a
  ``wandb.proto.wandb_internal_pb2.Record``.

The service keeps a block in memory until it is full, a flush interval has passed or the run
ends, so a run whose service was killed has lost its newest records: its file ends early,
often with the header alone, or in a torn chunk. Those records are not W&B's (``wandb
sync`` cannot read them either), and they are not read here: a record counts only whole and
with its checksum.

Nothing here imports Ray; the protobuf module comes with ``wandb``.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b":W&B"
HEADER = struct.Struct("<4sHB")  # ident, magic, version
MAGIC_NUMBER, VERSION = 0xBEE1, 0
CHUNK = struct.Struct("<IHB")  # checksum, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


class WandbFileError(ValueError):
    """A file that is not a W&B run file this reader knows (another format or version)."""


def _chunks(data: bytes) -> Iterator[tuple[int, bytes] | None]:
    """Every chunk of a run file's log after its header, as (type, payload); None for a
    chunk that is not whole (torn, or its checksum wrong): the rest of its block is
    skipped, as W&B's own reader does."""
    pos = HEADER.size
    while pos + CHUNK.size <= len(data):
        block_end = (pos // BLOCK + 1) * BLOCK
        if block_end - pos < CHUNK.size:  # the block's zero trailer
            pos = block_end
            continue
        checksum, length, kind = CHUNK.unpack_from(data, pos)
        start, end = pos + CHUNK.size, pos + CHUNK.size + length
        payload = data[start:end]
        if (end > min(block_end, len(data)) or kind not in (FULL, FIRST, MIDDLE, LAST)
                or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum):
            yield None
            pos = block_end
            continue
        yield kind, payload
        pos = end


def record_bytes(data: bytes) -> Iterator[bytes]:
    """The whole records of a run file's bytes, in the order written; a record cut short by
    a torn or missing chunk is left out. A file shorter than its header (its writer killed
    before it wrote one) holds none."""
    if len(data) < HEADER.size:
        return
    ident, magic, version = HEADER.unpack_from(data)
    if (ident, magic, version) != (MAGIC, MAGIC_NUMBER, VERSION):
        raise WandbFileError(f"not a W&B run file (version {VERSION}): header "
                             f"{data[:HEADER.size]!r}")
    parts: list[bytes] | None = None  # the record being put together
    for chunk in _chunks(data):
        if chunk is None:
            parts = None
            continue
        kind, payload = chunk
        if kind == FULL:
            parts = None
            yield payload
        elif kind == FIRST:
            parts = [payload]
        elif parts is not None:
            parts.append(payload)
            if kind == LAST:
                yield b"".join(parts)
                parts = None


def records(path: Path) -> Iterator[Any]:
    """The whole records of the run file at ``path``, as ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    for raw in record_bytes(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def ends_its_run(path: Path) -> bool:
    """Whether the run file at ``path`` is whole to its end: its last whole record is the
    run's exit (W&B's service writes it last, and may write it a moment after the run's
    ``finish`` has returned)."""
    from wandb.proto import wandb_internal_pb2

    last = None
    for last in record_bytes(Path(path).read_bytes()):
        pass
    if last is None:
        return False
    record = wandb_internal_pb2.Record()
    record.ParseFromString(last)
    return record.WhichOneof("record_type") == "exit"


def _key(item) -> str:
    """An item's key: ``key``, or its ``nested_key`` parts joined by dots (W&B's keys of
    logged dictionaries)."""
    return item.key or ".".join(item.nested_key)


@dataclass
class RunFile:
    """What one run file holds."""

    path: Path
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (step, values)
    summary: dict[str, Any] = field(default_factory=dict)  # every update applied, in order
    exit_code: int | None = None  # None: the run did not end in this file

    @property
    def folder(self) -> Path:
        return self.path.parent


def read_file(path: Path) -> RunFile:
    """One run file's history rows (their ``step`` and values, ``_step``, ``_runtime`` and
    ``_timestamp`` included), its summary and its exit, as far as it is whole."""
    out = RunFile(Path(path))
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            values = {_key(i): json.loads(i.value_json) for i in record.history.item}
            step = record.history.step.num if record.history.HasField("step") \
                else int(values.get("_step", 0))
            out.rows.append((int(step), values))
        elif kind == "summary":
            out.summary.update({_key(i): json.loads(i.value_json)
                                for i in record.summary.update})
            for item in record.summary.remove:
                out.summary.pop(_key(item), None)
        elif kind == "exit":
            out.exit_code = int(record.exit.exit_code)
    return out


@dataclass
class Held:
    """What W&B holds of one run (one id), over all its folders in the order written: a
    run written again (a resume, ``cae track``) is a new folder of the same id."""

    run_id: str
    files: list[RunFile] = field(default_factory=list)

    @property
    def rows(self) -> list[tuple[int, dict[str, Any]]]:
        return [row for f in self.files for row in f.rows]

    @property
    def steps(self) -> set[int]:
        return {step for step, _ in self.rows}

    @property
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.files:
            out.update(f.summary)
        return out

    @property
    def exit_code(self) -> int | None:
        """The newest folder's exit code; None if it did not end (open, or its writer
        killed)."""
        return self.files[-1].exit_code if self.files else None


def _order(path: Path, run_id: str) -> tuple:
    """Where a run's folder comes among its folders: by the time in its name, then W&B's
    suffix for a second folder in the same second (``-1``, ``-2``, ...)."""
    match = _FOLDER.match(path.parent.name)
    if not match or not match.group(2).startswith(run_id):
        return ("", 0, path.parent.name)
    suffix = match.group(2)[len(run_id):].lstrip("-")
    return (match.group(1), int(suffix) if suffix.isdigit() else 0, path.parent.name)


def run_files(folder: Path) -> dict[str, list[Path]]:
    """Run id -> its run files under a ``wandb/`` folder, oldest first (``latest-run`` and
    other links left out: they name a folder that is there)."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    for sub in folder.iterdir():
        if sub.is_symlink() or not sub.is_dir():
            continue
        for path in sub.glob("run-*.wandb"):
            found.setdefault(path.name[len("run-"):-len(".wandb")], []).append(path)
    return {run_id: sorted(paths, key=lambda p: _order(p, run_id))
            for run_id, paths in found.items()}


def read_runs(folder: Path) -> dict[str, Held]:
    """Run id -> what W&B holds of it, from every run file under a ``wandb/`` folder."""
    return {run_id: Held(run_id, [read_file(p) for p in paths])
            for run_id, paths in run_files(Path(folder)).items()}

"""What a run made by ``cae extend`` keeps beside its trials (``extends.json``): which trial
of another run each of its points trains on (point key -> that trial's directory, a full
path or URI), the epochs each source had trained (carried over, not trained by this run)
and how many more each trains at most.

``cae.sweep.extend`` writes it before the run starts; the trainable
(``cae.sweep.trainable``) reads it when a trial starts, so a trial starts from its source
on the first run and on a ``cae resume`` alike; the progress and status count only the
epochs this run trains. Ray-free: the driver writes it before Ray is imported (Ray reads
its network settings on import), and the readers of a run read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cae.run import checkpoints
from cae.run.directory import write_file

EXTENSION_FILE = "extends.json"


@dataclass(frozen=True)
class Extension:
    """``extends.json`` read back; empty for a run not made by ``cae extend``."""

    sources: dict[str, str] = field(default_factory=dict)  # point key -> source trial dir
    carried: dict[str, int] = field(default_factory=dict)  # point key -> its source's epochs
    more: int | None = None  # epochs each trial trains on at most

    def to_train(self) -> int | None:
        """The trial-epochs this run trains at most (None: not an extension, or one whose
        file predates the count)."""
        return None if self.more is None else self.more * len(self.sources)


def write_sources(run_dir: str, sources: dict[str, str], carried: dict[str, int],
                  more: int) -> None:
    """Record each point's source trial (point key -> its directory) and its epochs, and
    the ``more`` epochs each trains, in ``run_dir``."""
    write_file(run_dir, EXTENSION_FILE, json.dumps(
        {"sources": sources, "carried": carried, "more_epochs": more}, indent=1).encode())


def read_extension(run_dir: str) -> Extension:
    """What ``write_sources`` recorded; an empty Extension for a run not made by
    ``cae extend``."""
    import pyarrow.fs as pafs

    fs, path = checkpoints.filesystem(run_dir)
    where = f"{path.rstrip('/')}/{EXTENSION_FILE}"
    if fs.get_file_info(where).type != pafs.FileType.File:  # no error to tell from others
        return Extension()
    with fs.open_input_stream(where) as f:
        data = json.loads(f.read())
    return Extension(dict(data["sources"]), {k: int(v) for k, v in
                                             (data.get("carried") or {}).items()},
                     data.get("more_epochs"))


def read_sources(run_dir: str) -> dict[str, str]:
    """The sources ``write_sources`` recorded; {} for a run not made by ``cae extend``."""
    return read_extension(run_dir).sources

"""What a run made by ``cae extend`` keeps beside its trials: which trial of another run
each of its points trains on (``extends.json``: point key -> that trial's directory, a
full path or URI).

``cae.sweep.extend`` writes it before the run starts; the trainable
(``cae.sweep.trainable``) reads it when a trial starts, so a trial starts from its source
on the first run and on a ``cae resume`` alike. Ray-free: the driver writes it before Ray
is imported (Ray reads its network settings on import).
"""

from __future__ import annotations

import json

from cae.run import checkpoints
from cae.run.directory import write_file

EXTENSION_FILE = "extends.json"


def write_sources(run_dir: str, sources: dict[str, str]) -> None:
    """Record each point's source trial (point key -> its directory) in ``run_dir``."""
    write_file(run_dir, EXTENSION_FILE, json.dumps({"sources": sources}, indent=1).encode())


def read_sources(run_dir: str) -> dict[str, str]:
    """The sources ``write_sources`` recorded; {} for a run not made by ``cae extend``."""
    import pyarrow.fs as pafs

    fs, path = checkpoints.filesystem(run_dir)
    where = f"{path.rstrip('/')}/{EXTENSION_FILE}"
    if fs.get_file_info(where).type != pafs.FileType.File:  # no error to tell from others
        return {}
    with fs.open_input_stream(where) as f:
        return dict(json.loads(f.read())["sources"])

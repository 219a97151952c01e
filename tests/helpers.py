"""Helpers several test modules share: finding a test's own processes, killing a trial."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def processes_naming(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (a temp dir of the test)."""
    import psutil

    pids = []
    for proc in psutil.process_iter():
        try:
            if marker in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return pids


def kill_first_after(run_dir: Path, pattern: str, killed: dict, rows: int = 2,
                     timeout: float = 300.0) -> None:
    """SIGKILL the worker of the first trial (a ``pattern`` glob of run directories under
    ``run_dir``) whose result.json holds ``rows`` rows; ``killed`` gets its epoch and pid.
    Run it in a thread beside the sweep; it gives up after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for result in run_dir.glob(f"{pattern}/result.json"):
            lines = result.read_text().splitlines()
            if len(lines) >= rows:
                last = json.loads(lines[-1])
                killed.update(epoch=last["epoch"], pid=last["pid"])
                os.kill(last["pid"], signal.SIGKILL)
                return
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def epochs_reported(run_dir: Path) -> int:
    """Result lines the trials of a run directory have written (every epoch reported)."""
    return sum(len(p.read_text().splitlines()) for p in run_dir.glob("*/result.json"))

"""One driver per run directory: a lease file that names the driver holding it.

``cae sweep`` and ``cae resume`` take the lease (``driver.lease`` in the run directory:
host, pid, start, a heartbeat refreshed every ``BEAT_S`` seconds) before Ray starts, and
give it back when they end. A second driver is refused, naming the holder and how old its
heartbeat is. A lease whose driver is gone is taken over, with a line saying so: on this
host, when its process no longer exists; on another host (or for a run at a URI, where
processes cannot be asked), when its heartbeat is older than ``STALE_S``. ``force`` takes it
regardless. A driver that finds its lease taken by another stops its sweep (Tune saves the
state, the trials keep their checkpoints).

Locally the lease is created with a hard link, which fails if the file exists, so two
drivers starting at once cannot both take it; at a URI the object store has no such
operation: the driver writes the lease, waits, and reads it back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cae.config.errors import UserError
from cae.run.directory import is_uri, write_file

LEASE_FILE = "driver.lease"
BEAT_S = 30.0
STALE_S = 180.0


class LeaseHeld(UserError):
    """Another driver holds the run directory."""


@dataclass
class Holder:
    """Who holds a run directory's lease."""

    host: str
    pid: int
    started: float
    heartbeat: float
    command: str
    token: str

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    def alive(self) -> bool | None:
        """Whether its process runs: known only on its own host (None elsewhere). A process
        killed but not yet reaped by its parent (a zombie) keeps its pid and is gone."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return _state(self.pid) not in ("Z", "X")

    def describe(self, now: float | None = None) -> str:
        return (f"`{self.command}` (pid {self.pid} on {self.host}, heartbeat "
                f"{self.age(now):.0f} s ago)")


def _state(pid: int) -> str | None:
    """A process's state letter (``Z``: a zombie, ``X``: dead) from Linux's ``/proc``; None
    where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0]  # after the command, which may hold ')'
    except (OSError, ValueError, IndexError):
        return None


def _fs(run_dir: str):
    from cae.run.checkpoints import filesystem

    return filesystem(run_dir)


def read_holder(run_dir: str) -> Holder | None:
    """The lease's holder, or None when no driver holds the run directory."""
    fs, path = _fs(run_dir)
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{LEASE_FILE}") as f:
            return Holder(**json.loads(f.read()))
    except (OSError, ValueError, TypeError):
        return None


def stale(holder: Holder, now: float | None = None) -> bool:
    """Whether the holder is gone: its process has ended (same host), or its heartbeat is
    older than STALE_S (another host, or a run at a URI)."""
    alive = holder.alive()
    return (alive is False) or (alive is None and holder.age(now) > STALE_S)


class Lease:
    """The lease of ``run_dir`` for one driver; a context manager that takes it, keeps its
    heartbeat and gives it back."""

    def __init__(self, run_dir: str, command: str, force: bool = False,
                 say: Callable[[str], None] = print,
                 on_lost: Callable[[Holder | None], None] | None = None):
        self.run_dir, self.force, self.say, self.on_lost = run_dir, force, say, on_lost
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), now, now, command,
                         uuid.uuid4().hex)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: Path | None = None

    # ---- taking it ------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeld` naming its holder."""
        for _ in range(5):
            holder = read_holder(self.run_dir)
            if holder is not None and not (self.force or stale(holder)):
                raise LeaseHeld(
                    f"{self.run_dir} is in use by another driver: {holder.describe()}. Wait "
                    "for it to end, or, if it is gone, run again with --force")
            if holder is not None:
                why = "--force" if self.force and not stale(holder) else "it is gone"
                self.say(f"cae: taking over the run directory from {holder.describe()} "
                         f"({why})")
                if not self._remove(holder):
                    continue  # another driver removed it first: look again
            if self._create():
                return
        raise LeaseHeld(f"{self.run_dir}: another driver is taking it at the same moment")

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.me)).encode()

    def _create(self) -> bool:
        if is_uri(self.run_dir):
            write_file(self.run_dir, LEASE_FILE, self._payload())
            time.sleep(1.0)  # a driver writing at the same moment shows up by then
            held = read_holder(self.run_dir)
            return held is not None and held.token == self.me.token
        folder = Path(self.run_dir)
        if not folder.exists():
            self._made = folder  # given back with the lease if nothing else was written
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{LEASE_FILE}.{self.me.token}"
        tmp.write_bytes(self._payload())
        try:
            os.link(tmp, folder / LEASE_FILE)  # fails if the lease exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _remove(self, holder: Holder) -> bool:
        """Remove ``holder``'s lease; False if it was not there any more."""
        if is_uri(self.run_dir):
            fs, path = _fs(self.run_dir)
            fs.delete_file(f"{path.rstrip('/')}/{LEASE_FILE}")
            return True
        lease = Path(self.run_dir) / LEASE_FILE
        aside = lease.with_name(f".{LEASE_FILE}.gone.{self.me.token}")
        try:
            os.rename(lease, aside)  # only one of several drivers gets it
        except FileNotFoundError:
            return False
        aside.unlink(missing_ok=True)
        return True

    # ---- keeping it -----------------------------------------------------------------

    def beat(self) -> bool:
        """Refresh the heartbeat if the lease is still ours; False (and ``on_lost``) if
        another driver has taken it."""
        holder = read_holder(self.run_dir)
        if holder is None or holder.token != self.me.token:
            if self.on_lost is not None:
                self.on_lost(holder)
            return False
        self.me.heartbeat = time.time()
        write_file(self.run_dir, LEASE_FILE, self._payload())
        return True

    def _beat_loop(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                if not self.beat():
                    return
            except OSError:
                continue  # a full disk or a storage hiccup: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = read_holder(self.run_dir)
        if holder is not None and holder.token == self.me.token:
            try:
                self._remove(holder)
            except OSError:
                pass  # a later driver sees a dead process and takes it over
        if self._made is not None:
            try:
                self._made.rmdir()  # a sweep refused before it wrote anything
            except OSError:
                pass

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._beat_loop, name="cae-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

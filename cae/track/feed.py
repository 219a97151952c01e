"""Sending runs to a tracker off the training path: a queue and a background thread.

A :class:`Feed` takes tracker runs (or a function that makes them, run on its thread) and
sends them in the background, so that a tracker that is slow or down never slows or stops
a sweep. Updates of one trial waiting to be sent are merged (its epochs added up, its end
values and state the newest), so nothing is lost while the tracker is away: after a failure
the feed says so once, keeps what it holds and tries again every ``retry_s`` seconds, and at
the end tries once more for at most ``wait_s`` seconds. What it could not send is in the
run's tables, from which ``cae track`` sends it later.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from cae.track.runs import SweepRun, TrialRun

RETRY_S = 30.0  # after a failure, the next try this much later
_CLOSE = object()


class Tracker(Protocol):
    """What a feed sends to (``cae.track.mlflowtracker``, ``cae.track.wandbtracker``)."""

    kind: str
    label: str

    @property
    def errors(self) -> tuple[type[BaseException], ...]: ...
    def trial(self, run: TrialRun) -> None: ...
    def sweep(self, run: SweepRun) -> None: ...
    def forget(self) -> None: ...
    def close(self) -> None: ...


Runs = Iterable[TrialRun | SweepRun]


def merged(old: TrialRun | None, new: TrialRun) -> TrialRun:
    """Two updates of one trial waiting to be sent as one: every epoch of both (the newer
    wins), the newer's params, tags, end values and state."""
    if old is None:
        return new
    steps = {**old.steps, **new.steps}
    return TrialRun(new.trial_id, new.name, {**old.params, **new.params},
                    {**old.tags, **new.tags}, steps, {**old.summary, **new.summary}, new.state)


class Feed:
    """One tracker, fed in the background (see the module docstring). ``say`` prints a
    line for the user (the warning when the tracker fails)."""

    def __init__(self, tracker: Tracker, say: Callable[[str], None],
                 retry_s: float = RETRY_S, hint: str = ""):
        self.tracker, self.say, self.retry_s, self.hint = tracker, say, retry_s, hint
        self.warned = False
        self.failure: str | None = None  # the last failure, until a send succeeds
        self._queue: queue.Queue = queue.Queue()
        self._trials: dict[str, TrialRun] = {}  # waiting to be sent
        self._sweep: SweepRun | None = None
        self._retry_at = 0.0
        self._closed = False  # the thread reached its end (it did not break on the way)
        self._thread = threading.Thread(target=self._loop, name=f"cae-track-{tracker.kind}",
                                        daemon=True)  # never holds the process at its exit
        self._thread.start()

    def put(self, runs: Runs | Callable[[], Runs]) -> None:
        """Runs to send, or a function that makes them (it runs on the feed's thread)."""
        self._queue.put(runs)

    def close(self, wait_s: float | None) -> int:
        """Send what is left, waiting at most ``wait_s`` seconds (None: until it is done);
        returns how many trials (and the sweep's run) were not sent."""
        self._queue.put(_CLOSE)
        self._thread.join(wait_s)
        left = len(self._trials) + (self._sweep is not None)
        if self._thread.is_alive() or not self._closed:  # still sending, or it broke (a
            return max(1, left + self._queue.qsize() - 1)  # bug: its traceback is printed)
        return left

    # ---- the feed's thread -----------------------------------------------------------------

    def _take(self, item) -> None:
        for run in item() if callable(item) else item:
            if isinstance(run, SweepRun):
                self._sweep = run
            else:
                self._trials[run.trial_id] = merged(self._trials.get(run.trial_id), run)

    def _loop(self) -> None:
        closing = False
        while not closing:
            waiting = bool(self._trials or self._sweep)
            timeout = max(0.05, self._retry_at - time.monotonic()) if waiting else None
            items = []
            try:
                items.append(self._queue.get(timeout=timeout))
                while True:  # everything queued meanwhile: one trial's updates go together
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                if item is _CLOSE:
                    closing = True
                else:
                    self._take(item)
            if closing or time.monotonic() >= self._retry_at:
                self._send()
        try:
            self.tracker.close()
        except self.tracker.errors as exc:
            self._failed(exc)
        self._closed = True

    def _send(self) -> None:
        try:
            for trial_id in list(self._trials):
                self.tracker.trial(self._trials[trial_id])
                del self._trials[trial_id]
            if self._sweep is not None:
                self.tracker.sweep(self._sweep)
                self._sweep = None
        except self.tracker.errors as exc:
            self._failed(exc)
            return
        self.failure = None

    def _failed(self, exc: BaseException) -> None:
        self.failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" \
            if str(exc).strip() else type(exc).__name__
        self._retry_at = time.monotonic() + self.retry_s
        self.tracker.forget()
        if not self.warned:
            self.warned = True
            self.say(f"cae: warning: {self.tracker.label} did not take the sweep's runs "
                     f"({self.failure}); the sweep goes on without waiting for it, trying "
                     f"again every {self.retry_s:.0f} s{self.hint}")

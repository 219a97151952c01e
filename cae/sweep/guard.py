"""What keeps a running sweep's run directory whole: a Ray Tune callback on the driver.

- It keeps a last good copy of Tune's state (``cae.run.state.keep_copy``) every
  ``COPY_EVERY_S`` seconds and at the end, so that a state file cut short is never the end
  of a run (local run directories: at a URI each file is written whole).
- At the first trial failure that says the disk is full (or when the storage has less room
  left than an average trial's kept checkpoints), it stops the sweep as Ctrl-C does: no
  trial is retried into a full disk, the running trials keep their checkpoints, Tune saves
  what it can, and the driver ends with one line (``cae.sweep.driver``).
- ``stop(reason)`` does the same for other reasons (the run's lease taken by another
  driver).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial

from cae.run import diskspace
from cae.run import state as runstate
from cae.run.directory import is_uri, local_path
from cae.sweep import internals

COPY_EVERY_S = 15.0


def _error_text(trial: Trial) -> str:
    try:
        return Path(trial.error_file).read_text()
    except (OSError, TypeError):
        return ""


class RunGuard(tune.Callback):
    """See the module docstring; ``room`` is the free space below which the storage counts
    as full (``cae.sweep.driver`` gives an average trial's kept checkpoints, from the dry run's
    disk estimate: ``cae.run.diskspace.estimate``, which counts a fused pack's stacked state
    too)."""

    def __init__(self, run_dir: str, room: int = 0,
                 say: Callable[[str], None] | None = None):
        self.run_dir, self.room = run_dir, int(room)
        self.say = say or print
        self.local = None if is_uri(run_dir) else local_path(run_dir)
        self.stopped: str | None = None  # why the sweep was stopped, if it was
        self._last_copy, self._every, self._retry_at = 0.0, COPY_EVERY_S, 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # Tune pickles its run config: settings only
        return {"run_dir": self.run_dir, "room": self.room}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["run_dir"], state["room"])

    def stop(self, reason: str) -> None:
        """End the sweep gracefully (once), remembering why."""
        with self._lock:
            if self.stopped is None:
                self.stopped = reason
                internals.request_graceful_stop()

    def storage_full(self, error: str = "") -> bool:
        if diskspace.is_full_error(error):
            return True
        return self.local is not None and diskspace.free_bytes(self.local) < self.room

    def _failed(self, trial: Trial) -> None:
        if self.stopped is None and self.storage_full(_error_text(trial)):
            self.stop("storage full")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self._failed(trial)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self._failed(trial)

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        now = time.monotonic()
        if self.local is not None and now - self._last_copy >= self._every \
                and now >= self._retry_at:
            if self._copy_state() is not None:
                # a big sweep's state takes a while to copy: never more than 5% of the time
                self._every = max(COPY_EVERY_S, 20 * (time.monotonic() - now))
                self._last_copy = time.monotonic()
            else:  # no whole, settled state yet: look again in a moment, not every step
                self._retry_at = time.monotonic() + runstate.QUIET_S / 2

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        # Tune has just written its last state and waited for the copy to finish
        # (``tune.run``: a forced checkpoint before the cleanup that calls this): no copy
        # is under way to wait out
        if self.local is not None:
            self._copy_state(quiet=0.0)

    def _copy_state(self, quiet: float = runstate.QUIET_S) -> bool | None:
        try:
            return runstate.keep_copy(self.local, quiet=quiet)
        except OSError as exc:  # a full disk: noticed through the trials' failures
            if diskspace.is_full_error(exc) and self.stopped is None:
                self.stop("storage full")
            return False

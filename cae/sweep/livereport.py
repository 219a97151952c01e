"""The report of a running sweep, rewritten every few minutes so it can be opened mid-run.

``LiveReport`` finishes the run as it stands (``cae.results.finish``: the tables and the HTML
report) without the test-sample pictures and the reference errors: those load the dataset
and the best trials' checkpoints, which is the expensive part of a report and would compete
with the trials; ``cae sweep`` ends with the full report. It runs in a background
thread on the driver, one write at a time, so the sweep is never held up; a run at a URI is
read through its local mirror and the files go back next to it (``cae.run.directory``). A report
that fails costs one line on the console, never the sweep.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cae.config.errors import debug


class LiveReport:
    """Rewrites ``run_dir``'s report every ``every`` seconds (0: never) while a sweep runs."""

    def __init__(self, run_dir: str, every: float, say: Callable[[str], None] | None = None):
        """``say`` prints a line (the progress callback's, so it lands above its bar)."""
        self.run_dir, self.every = run_dir, float(every)
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._due = time.monotonic() + self.every
        self._thread: threading.Thread | None = None
        self.written = 0  # reports written so far
        self.path: Path | None = None

    def __getstate__(self) -> dict:  # pickled with Tune's run config: settings only
        return {"run_dir": self.run_dir, "every": self.every}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["run_dir"], state["every"])

    def tick(self, now: float | None = None) -> None:
        """Start a rewrite in the background if one is due and none is under way."""
        now = time.monotonic() if now is None else now
        if self.every <= 0 or now < self._due or self.busy:
            return
        self._due = now + self.every
        self._thread = threading.Thread(target=self.write, name="cae-live-report", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def finish(self, rewrite: bool) -> None:
        """At the end of the sweep: wait for a rewrite under way; with ``rewrite``, write
        the report once more if one was written during the run (so it is not left showing
        the run half done)."""
        if self._thread is not None:
            self._thread.join()
        if rewrite and self.written:
            self.write()

    def write(self) -> Path | None:
        """Export the tables and write the report (no pictures, no reference errors: see
        ``cae.results.finish``); never raises."""
        from cae.results.finish import finish

        try:
            report = finish(self.run_dir, pictures=False, references=False,
                            say=lambda text: None).report
        except Exception as exc:  # noqa: BLE001 - a report must never end the sweep
            self.say(f"cae: the live report could not be written ({type(exc).__name__}: "
                      f"{exc}); the sweep goes on")
            if debug():
                import traceback

                traceback.print_exc()
            return None
        self.written += 1
        self.path = report
        return report

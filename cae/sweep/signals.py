"""SIGTERM stops a sweep the way Ctrl-C does: experiment state saved, the run resumable.

Inside ``Tuner.fit()`` Ray Tune ends a run gracefully on SIGINT and SIGUSR1: its loop stops,
the experiment state is written one last time, and every trial keeps the checkpoint of its
last finished epoch, so ``cae resume`` goes on from there. SIGTERM it leaves alone, and
SIGTERM is what a batch system sends when a job reaches its time limit (Slurm, with SIGKILL
``KillWait`` seconds later), what ``scancel`` sends, and what a container runtime sends on
stop. ``sigterm_stops_tune`` turns the first SIGTERM of a fit into SIGUSR1 for Tune's own
handler (``internals.request_graceful_stop``); a second SIGTERM does what SIGTERM did
before (Ray's driver exits).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from cae.sweep import internals


@contextmanager
def sigterm_stops_tune() -> Iterator[None]:
    """For the length of the block (one ``tuner.fit()``), SIGTERM ends the Tune run like
    SIGUSR1. A SIGTERM that arrives before Tune's loop has installed its handler (while the
    Tuner is being built: nothing has been trained since the run's last saved state) is
    handled as before."""
    if not hasattr(signal, "SIGUSR1"):  # Windows: nothing to hand it to
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed outside Python: restore the default
        previous = signal.SIG_DFL
    usr1_before = signal.getsignal(signal.SIGUSR1)  # a handler of an earlier fit, or none

    def handler(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM: as before
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop) and tune_stop is not usr1_before:
            internals.request_graceful_stop()  # SIGUSR1 to this process
        elif callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)  # the default action (or ignored, as before)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

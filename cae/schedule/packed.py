"""Fused packs under successive halving on Ray Tune: a searcher that hands out the packs and a
scheduler that decides for their members, around one ``cae.schedule.packbook.PackBook``.

A pack is one Tune trial; its members are the trials of the sweep. ``PackSearcher`` hands
out the packs the book forms (the sweep's first packs, then the survivors of each rung,
regrouped) and keeps the book: Tune saves a searcher's state with every snapshot of the
experiment, so a resumed sweep goes on from the book as it stood with the trials. The
scheduler (``PackScheduler``) files each pack's results in the book, member by member
(``sha``: a ``RungBook`` per stratum; ``asha``: Ray's ``ASHAScheduler`` per stratum, each
member a trial to it), stops a pack at a rung, and writes ``stopped.json`` into the folder of
each member the halving stops, so that the run's readers see it stopped as an unfused trial
is (``cae.run.packfiles``).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from cae.run.directory import write_file
from cae.run.packfiles import STOPPED_FILE
from cae.schedule.halving import MetricModeScheduler
from cae.schedule.packbook import CONTINUE, STOP, PackBook, Seat, SyncDecider
from cae.sweep.internals import mark_for_experiment_state, results_one_at_a_time

MEMBERS = "members"  # a pack's report: each member's metrics under members/<id>/<key>


class AsyncDecider:
    """``asha``'s decisions for one stratum: Ray's ``ASHAScheduler`` (one bracket), each
    member a trial to it."""

    def __init__(self, asha: ASHAScheduler):
        self.asha, self.known = asha, set()

    def add(self, seat: Seat) -> None:
        self.asha.on_trial_add(None, seat)
        self.known.add(seat.trial_id)

    def _result(self, seat: Seat) -> dict:
        return {"epoch": seat.epoch, self.asha.metric: seat.value}

    def result(self, seat: Seat) -> str:
        decision = self.asha.on_trial_result(None, seat, self._result(seat))
        return STOP if decision == TrialScheduler.STOP else CONTINUE

    def ended(self, seat: Seat, errored: bool = False) -> None:
        if seat.trial_id in self.known:
            self.known.discard(seat.trial_id)
            if errored:
                self.asha.on_trial_remove(None, seat)
            else:
                self.asha.on_trial_complete(None, seat, self._result(seat))

    def back(self, seat: Seat) -> None:
        if seat.trial_id not in self.known:
            self.add(seat)

    def decide(self) -> tuple[list[Seat], list[Seat]]:
        return [], []  # asynchronous: each result is decided as it comes

    def ahead(self, seat: Seat) -> bool:
        return False


def deciders(kind: str, rungs: list[int], *, max_t: int, grace_period: int,
             reduction_factor: float, metric: str, mode: str) -> Callable[[tuple], object]:
    """The factory of one stratum's decider for ``scheduler.kind``."""
    if kind == "sha":
        return lambda stratum: SyncDecider(rungs, reduction_factor, mode, max_t)
    return lambda stratum: AsyncDecider(ASHAScheduler(
        time_attr="epoch", metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
        reduction_factor=reduction_factor))


class PackSearcher(Searcher):
    """Hands out the packs of the book (``PackBook.next_pack``); nothing while none is formed
    (a rung waits), finished when no member will train again. Its saved state is the book."""

    def __init__(self, book: PackBook, metric: str | None = None, mode: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self.book = book

    def suggest(self, trial_id: str) -> dict | None:
        config = self.book.next_pack(trial_id)
        if config is None:
            return Searcher.FINISHED if self.book.finished() else None
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """The scheduler files what a pack did; a pack that failed for good (Tune tells a
        searcher only then) has its members go on in a new one (``PackBook.pack_failed``)."""
        if error:
            self.book.pack_failed(trial_id)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.book, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.book = pickle.load(f)


def book_of(controller) -> PackBook:
    """The book of the ``PackSearcher`` behind the controller's search algorithm (Tune wraps
    a searcher, in a ``ConcurrencyLimiter`` too where concurrency is limited)."""
    searcher = getattr(controller, "search_alg", None)
    while searcher is not None and not isinstance(searcher, PackSearcher):
        searcher = getattr(searcher, "searcher", None)
    if searcher is None:
        raise RuntimeError("a fused sweep under halving runs with its PackSearcher")
    return searcher.book


def member_reports(result: dict) -> dict[str, dict]:
    """Each member's metrics from a pack's (flattened) result: ``members/<id>/<key>``."""
    out: dict[str, dict] = {}
    prefix = MEMBERS + "/"
    for key, value in result.items():
        if key.startswith(prefix):
            member, _, name = key[len(prefix):].partition("/")
            out.setdefault(member, {})[name] = value
    nested = result.get(MEMBERS)
    if isinstance(nested, dict):  # not flattened
        for member, metrics in nested.items():
            out.setdefault(member, {}).update(metrics)
    return out


@results_one_at_a_time  # a pack stops exactly at its rung
class PackScheduler(MetricModeScheduler):
    """Successive halving of a fused sweep's members (see the module doc); the packs run
    in the order they are formed. ``run_dir``: where the stop marks go."""

    def __init__(self, run_dir: str, metric: str | None = None, mode: str | None = None):
        super().__init__(metric, mode)
        self.run_dir = run_dir.rstrip("/")
        self._fates: dict[str, int] = {}

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        book_of(tune_controller).pack_back(trial.trial_id)  # a failed pack retried

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        book = book_of(tune_controller)
        reports = member_reports(result)
        if not reports:
            return TrialScheduler.CONTINUE
        idle = not book.formed and not any(t.status == Trial.PENDING
                                            for t in tune_controller.get_trials())
        stop, stopped, others = book.pack_result(trial.trial_id, reports, idle)
        self._mark(stopped)
        for other in tune_controller.get_trials():
            if other.trial_id in others and other.status not in (Trial.TERMINATED,
                                                                 Trial.ERROR):
                tune_controller.stop_trial(other)
                mark_for_experiment_state(tune_controller, other)
        self._fates = fates(book)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def _mark(self, stopped: list[Seat]) -> None:
        """Each member the halving stopped: ``stopped.json`` in its folder (what the run's
        readers see; the rung, the epoch it was at and the stratum's scheduler)."""
        for seat in stopped:
            if seat.home:
                write_file(f"{self.run_dir}/{seat.home}", STOPPED_FILE, json.dumps(
                    {"epoch": seat.epoch, "value": seat.value}).encode())

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict | None = None
                          ) -> None:
        book = book_of(tune_controller)
        book.pack_ended(trial.trial_id)
        self._fates = fates(book)

    on_trial_remove = on_trial_complete

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        book_of(tune_controller).pack_ended(trial.trial_id, errored=True)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """The first pack waiting for a worker, in the order they were formed; with none, the
        book decides what it can (after a restore, or a pack that failed for good) and the
        members queued for a pack are formed into packs (a worker would sit idle)."""
        book = book_of(tune_controller)
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                return trial
        book.settle()
        if not book.formed:
            book.flush()
        self._fates = fates(book)
        return None

    def member_fates(self) -> dict[str, int]:
        """How many members are in each progress bucket (done, running, paused, pending,
        errored), as of the last result or end of a pack."""
        return dict(self._fates)

    def debug_string(self) -> str:
        return f"fused halving: {self._fates}"


# a member's fate in the book -> its progress bucket (``cae.run.outcomes.BUCKETS``)
_BUCKET = {"training": "running", "waiting": "paused", "stopped": "done", "ended": "done",
           "failed": "errored"}


def fates(book: PackBook) -> dict[str, int]:
    """The book's members by progress bucket (one queued before its first epoch is
    pending, one queued later paused, as it waits for its next pack)."""
    out: dict[str, int] = {}
    for seat in book.seats.values():
        kind = _BUCKET.get(seat.fate) or ("pending" if seat.epoch == 0 else "paused")
        out[kind] = out.get(kind, 0) + 1
    return out

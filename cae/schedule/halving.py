"""Synchronous successive halving (``scheduler.kind: sha``) as a Ray Tune scheduler: a rung
is decided only when the whole stratum has reached it, so the outcome does not depend on
trial order. The stratum's ``RungBook`` (``cae.schedule.rungbook``) makes the decisions;
this class files Tune's callbacks in the book, carries out what it decides and chooses what
runs next. ``cae.schedule.workahead`` extends it; ``cae.schedule.schedulers`` runs one per
stratum.
"""

from __future__ import annotations

import bisect
import heapq
import json
from collections.abc import Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from cae.config.points import REPEAT_KEY
from cae.config.spec import rungs
from cae.schedule.rungbook import Entry, RungBook
from cae.sweep.internals import keep_paused, mark_for_experiment_state, results_one_at_a_time

# Keys the speculation callback adds to a result trained past a rung not decided yet
# (``cae.schedule.workahead``): the rung's epoch and the trial's value there (what the rung
# ranks it by, read back on a restore).
SPECULATIVE, SPECULATIVE_VALUE = "speculative", "speculative_rung_value"


def search_finished(controller) -> bool:
    """Whether every trial has been created (rungs must not be decided on a partial set)."""
    search_alg = getattr(controller, "search_alg", None)
    return search_alg is None or search_alg.is_finished()


def arch_key(config: dict) -> str:
    """A trial's configuration without its repeat: repeats cost the same per epoch."""
    return json.dumps({k: v for k, v in config.items() if k != REPEAT_KEY}, sort_keys=True,
                      default=str)


class MetricModeScheduler(TrialScheduler):
    """A scheduler given its metric and mode here or by ``tune.TuneConfig``: a missing one
    is filled in, the same ones agree (Ray's own schedulers refuse both)."""

    def __init__(self, metric: str | None = None, mode: str | None = None):
        super().__init__()
        self._metric, self._mode = metric, mode

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric and metric != self._metric) or (
                self._mode and mode and mode != self._mode):
            return False
        self._metric, self._mode = self._metric or metric, self._mode or mode
        return True


# ---- what runs next ---------------------------------------------------------------------


class _Queue:
    """Entries waiting for a worker, by group (architecture, level): the next is the first
    (in creation order) of the costliest group; equal costs go by creation order."""

    def __init__(self):
        self._by: dict[tuple, list[tuple[int, Entry]]] = {}

    def push(self, e: Entry, group: tuple) -> None:
        heapq.heappush(self._by.setdefault(group, []), (e.order, e))

    def peek(self, ok: Callable[[Entry], bool], cost: Callable[[tuple], float]
             ) -> tuple[tuple, Entry] | None:
        best = None
        for group in list(self._by):
            heap = self._by[group]
            while heap and not ok(heap[0][1]):
                heapq.heappop(heap)
            if not heap:
                del self._by[group]
                continue
            key = (-cost(group), heap[0][0])
            if best is None or key < best[0]:
                best = (key, heap[0][1])
        return best


class _Promoted:
    """Promoted trials not running yet, by (architecture, level), in creation order. Not a
    lazy queue: a trial promoted while Ray is still pausing it (RUNNING until its checkpoint
    is saved) must stay, to be found once PAUSED; it leaves when it reports again or ends."""

    def __init__(self):
        self._by: dict[tuple, list[tuple[int, Entry]]] = {}
        self._group: dict[str, tuple] = {}

    def add(self, e: Entry, group: tuple) -> None:
        self.discard(e)
        bisect.insort(self._by.setdefault(group, []), (e.order, e), key=lambda x: x[0])
        self._group[e.trial_id] = group

    def discard(self, e: Entry) -> None:
        group = self._group.pop(e.trial_id, None)
        if group is not None:
            self._by[group].remove((e.order, e))
            if not self._by[group]:
                del self._by[group]

    def peek(self, ok: Callable[[Entry], bool], cost: Callable[[tuple], float]
             ) -> tuple[tuple, Entry] | None:
        best = None
        for group, members in self._by.items():
            first = next((e for _, e in members if ok(e)), None)
            if first is not None and (best is None or (-cost(group), first.order) < best[0]):
                best = ((-cost(group), first.order), first)
        return best


# ---- the scheduler ----------------------------------------------------------------------


@results_one_at_a_time  # to pause a trial exactly at its rung
class SyncHalvingScheduler(MetricModeScheduler):
    """Synchronous successive halving, one bracket, rungs at epochs ``grace_period *
    reduction_factor**k`` below ``max_t``.

    A trial reaching rung k is PAUSED (checkpointed, resources freed) until every trial that
    passed rung k-1 has reached rung k or ended (an ended trial competes with its last value,
    then leaves), and the search has created all trials. Then the best ``ceil(n / rf)`` (at
    least 1) continue, the others STOP; ties go by the trial config, never by arrival
    (``RungBook``). Not Ray's HyperBandScheduler: it fills fixed-size brackets in arrival
    order, drops ended trials from the ranking and breaks ties by arrival. Tune does not
    save schedulers; on restore the state is rebuilt from each trial's last result (past a
    rung = promoted, unless the result says it was trained past the rung speculatively).
    ``WorkAheadScheduler`` (``cae.schedule.workahead``) keeps workers busy while a rung
    waits, deciding the same.
    """

    work_ahead = False  # see cae.schedule.workahead.WorkAheadScheduler
    book_class = RungBook

    def __init__(self, time_attr: str = "epoch", metric: str | None = None,
                 mode: str | None = None, max_t: int = 100, grace_period: int = 1,
                 reduction_factor: float = 3):
        super().__init__(metric, mode)
        if not (grace_period >= 1 and max_t >= grace_period and reduction_factor > 1):
            raise ValueError("sha needs 1 <= grace_period <= max_t and reduction_factor > 1")
        self._time_attr, self._max_t = time_attr, max_t
        self.rungs = rungs(grace_period, reduction_factor, max_t)  # epochs
        self._book = self.book_class(self.rungs, reduction_factor, self._mode)
        self._num_stopped = 0
        self._deciding = False
        self._pending, self._promoted = _Queue(), _Promoted()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        agreed = super().set_search_properties(metric, mode, **spec)
        self._book.rank_by(self._mode)
        return agreed

    # ---- Tune's callbacks -------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError("SyncHalvingScheduler needs a metric and a mode ('min' or "
                             "'max'): pass them here or to tune.TuneConfig()")
        if (e := self._book.entries.get(trial.trial_id)) is not None:
            # retried after a failure: it keeps its rungs, goes on from its checkpoint
            self._book.set(e, ended=False, errored=False)
            self._queue(e)
            return
        e = Entry(trial, len(self._book.entries), arch_key(trial.config),
                  json.dumps(trial.config, sort_keys=True, default=str))
        e.ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
        self._restore(e, trial.last_result or {})
        self._book.add(e)
        self._queue(e)

    def _restore(self, e: Entry, last: dict) -> None:
        """A trial restored with results: its place rebuilt from its last result."""
        if self._time_attr not in last or self._metric not in last:
            return
        e.epoch, e.last = last[self._time_attr], last[self._metric]
        e.level = sum(r < e.epoch for r in self.rungs)  # continued past = promoted
        if last.get(SPECULATIVE) in self.rungs:  # ... unless trained past it ahead
            e.level = self.rungs.index(last[SPECULATIVE])
            e.score = last.get(SPECULATIVE_VALUE, e.last)
        elif self._book.waiting(e):
            e.score = e.last
        if self._book.waiting(e) and e.trial.status == Trial.PENDING:
            keep_paused(e.trial)  # else Tune would start it past its undecided rung

    def _queue(self, e: Entry) -> None:
        self._pending.push(e, (e.arch, e.level))
        if e.epoch > 0:  # restored or retried with epochs done: may be promoted and paused
            self._promoted.add(e, (e.arch, e.level))

    def _cost(self, group: tuple) -> float:
        """Seconds per epoch of a trial of ``group`` (architecture, level), for the order
        trials start in: the same for all here (creation order)."""
        return 0.0

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        e = self._book.entries[trial.trial_id]
        self._promoted.discard(e)  # it runs
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        self._book.set(e, epoch=result[self._time_attr], last=result[self._metric])
        if e.epoch >= self._max_t:
            return TrialScheduler.STOP
        self._book.arrive(e)
        self._decide(tune_controller, current=trial)
        return self._decision(e, result)

    def _decision(self, e: Entry, result: dict) -> str:
        """What a trial does after its result, once the rungs are decided: waiting at its
        rung it pauses."""
        if e.ended:
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE if self._book.waiting(e) else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict | None = None) -> None:
        e = self._book.entries[trial.trial_id]
        changes = {}  # it competes with its last value
        if result and self._time_attr in result and self._metric in result:
            changes = {"epoch": result[self._time_attr], "last": result[self._metric]}
        self._end(e, **changes)
        self._decide(tune_controller)

    on_trial_remove = on_trial_complete

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        # no decision now: a trial to be retried is added again right after this call;
        # the next choose_trial_to_run decides
        self._end(self._book.entries[trial.trial_id], errored=True)

    def _end(self, e: Entry, **changes) -> None:
        self._book.set(e, ended=True, **changes)
        self._promoted.discard(e)

    # ---- decisions --------------------------------------------------------------------

    def _decide(self, tune_controller, current: Trial | None = None) -> None:
        """Decide every rung whose population has all arrived (idempotent, not re-entrant:
        stopping a trial calls back into the scheduler)."""
        if self._deciding or not search_finished(tune_controller):
            return
        self._deciding = True
        try:
            for k in range(len(self.rungs)):
                if not self._book.complete(k):  # someone is still on the way to this rung
                    self._incomplete(k)
                    return
                promoted, stopped = self._book.decide(k)
                for e in promoted:  # to run when paused (or pending, restored)
                    self._promoted.add(e, (e.arch, e.level))
                for e in stopped:
                    self._promoted.discard(e)
                self._stop(tune_controller, stopped, current)
        finally:
            self._deciding = False

    def _incomplete(self, k: int) -> None:
        """Rung k waits for trials on their way to it (nothing to do but wait here)."""

    def _stop(self, tune_controller, stopped: list[Entry], current: Trial | None) -> None:
        """Stop the trials a rung did not promote (``current``, whose result is being
        handled, stops by the decision returned for it)."""
        self._num_stopped += len(stopped)
        for trial in (e.trial for e in stopped):
            if trial is not current and trial.status not in (Trial.TERMINATED, Trial.ERROR):
                tune_controller.stop_trial(trial)  # PAUSED, RUNNING, saving, PENDING
                mark_for_experiment_state(tune_controller, trial)

    # ---- what runs next ---------------------------------------------------------------

    def _is_promoted(self, e: Entry) -> bool:
        return (not e.ended and not self._book.waiting(e) and (
            e.trial.status == Trial.PAUSED or (e.trial.status == Trial.PENDING and e.epoch > 0)))

    def _is_pending(self, e: Entry) -> bool:
        return e.trial.status == Trial.PENDING and not e.ended and not self._book.waiting(e)

    def candidates(self, tune_controller) -> dict[str, tuple]:
        """What this stratum could run next, by kind: ``promoted`` (paused past a decided
        rung), ``pending`` (not started), each as (priority, trial), lower first. Also
        decides rungs that became complete when the search ended."""
        self._decide(tune_controller)
        out = {}
        for kind, queue, ok in (("promoted", self._promoted, self._is_promoted),
                                ("pending", self._pending, self._is_pending)):
            if (found := queue.peek(ok, self._cost)) is not None:
                out[kind] = (found[0], found[1].trial)
        return out

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Promoted paused trials first, then new ones (then, working ahead, one to train
        ahead); a paused trial waiting at an undecided rung is not run otherwise."""
        found = self.candidates(tune_controller)
        for kind in ("promoted", "pending", "ahead"):
            if kind in found:
                return found[kind][1]
        return None

    def debug_string(self) -> str:
        waiting = sum(map(self._book.waiting, self._book.entries.values()))
        return f"SyncHalving: rungs {self.rungs}, {waiting} waiting, {self._num_stopped} stopped"

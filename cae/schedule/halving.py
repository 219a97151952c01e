"""Synchronous successive halving (``scheduler.kind: sha``): a rung is decided only when
the whole stratum has reached it, so the outcome does not depend on trial order; with
``work_ahead`` idle workers train on ahead of an undecided rung without changing any
decision. ``cae.schedule.schedulers`` runs one per stratum.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from cae.config.points import REPEAT_KEY
from cae.config.spec import rungs
from cae.sweep.internals import keep_paused, mark_for_experiment_state


def _agree(self, metric: str | None, mode: str | None, **spec) -> bool:
    """``set_search_properties``: fill in a missing metric/mode; the same ones agree."""
    if (self._metric and metric and metric != self._metric) or (
            self._mode and mode and mode != self._mode):
        return False
    self._metric, self._mode = self._metric or metric, self._mode or mode
    return True


def _search_finished(controller) -> bool:
    """Whether every trial has been created (rungs must not be decided on a partial set)."""
    search_alg = getattr(controller, "search_alg", None)
    return search_alg is None or search_alg.is_finished()



# ---- synchronous successive halving -----------------------------------------------------

# Keys the speculation callback adds to a result trained past a rung not decided yet: the
# rung's epoch and the trial's value there (what the rung ranks it by, kept for a restore).
SPECULATIVE, SPECULATIVE_VALUE = "speculative", "speculative_rung_value"


@dataclass(eq=False)
class _Entry:
    trial: Trial
    order: int  # creation order
    arch: str  # its config but the repeat: what its epochs cost is learnt by
    config: str  # its config as JSON: ties are broken by it
    epoch: float = 0.0
    last: float | None = None  # latest metric value
    score: float | None = None  # value when it reached the rung it waits at
    level: int = 0  # rungs passed (promoted through)
    ended: bool = False  # completed, errored, removed or stopped
    errored: bool = False  # ended by an error: may come back (a retry)


def arch_key(config: dict) -> str:
    """A trial's configuration without its repeat: repeats cost the same per epoch."""
    return json.dumps({k: v for k, v in config.items() if k != REPEAT_KEY}, sort_keys=True,
                      default=str)


class CostBook:
    """Seconds per epoch seen so far for each ``arch_key`` (Ray's ``time_this_iter_s``);
    one book is shared by the strata of a sweep."""

    def __init__(self):
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def see(self, arch: str, seconds: float) -> None:
        self._sum[arch] = self._sum.get(arch, 0.0) + seconds
        self._n[arch] = self._n.get(arch, 0) + 1

    def cost(self, arch: str) -> float:
        """Mean seconds per epoch; an architecture not seen yet counts as the costliest
        (so that it is started early and learnt)."""
        n = self._n.get(arch)
        return self._sum[arch] / n if n else math.inf


class _Queue:
    """Entries waiting for a worker, by architecture: the next is the first (in creation
    order) of the costliest architecture; equal costs go by creation order."""

    def __init__(self):
        self._by: dict[tuple, list[tuple[int, _Entry]]] = {}

    def push(self, e: _Entry, group: tuple) -> None:
        heapq.heappush(self._by.setdefault(group, []), (e.order, e))

    def peek(self, ok: Callable[[_Entry], bool], cost: Callable[[tuple], float]
             ) -> tuple[tuple, _Entry] | None:
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
        self._by: dict[tuple, list[tuple[int, _Entry]]] = {}
        self._group: dict[str, tuple] = {}

    def add(self, e: _Entry, group: tuple) -> None:
        self.discard(e)
        bisect.insort(self._by.setdefault(group, []), (e.order, e), key=lambda x: x[0])
        self._group[e.trial.trial_id] = group

    def discard(self, e: _Entry) -> None:
        group = self._group.pop(e.trial.trial_id, None)
        if group is not None:
            self._by[group].remove((e.order, e))
            if not self._by[group]:
                del self._by[group]

    def peek(self, ok: Callable[[_Entry], bool], cost: Callable[[tuple], float]
             ) -> tuple[tuple, _Entry] | None:
        best = None
        for group, members in self._by.items():
            first = next((e for _, e in members if ok(e)), None)
            if first is not None and (best is None or (-cost(group), first.order) < best[0]):
                best = ((-cost(group), first.order), first)
        return best


class SyncHalvingScheduler(TrialScheduler):
    """Synchronous successive halving, one bracket, rungs at epochs ``grace_period *
    reduction_factor**k`` below ``max_t``.

    A trial reaching rung k is PAUSED (checkpointed, resources freed) until every trial that
    passed rung k-1 has reached rung k or ended (an ended trial competes with its last value,
    then leaves), and the search has created all trials. Then the best ``ceil(n / rf)`` (at
    least 1) continue, the others STOP; ties go by the trial config, never by arrival. Not
    Ray's HyperBandScheduler: it fills fixed-size brackets in arrival order, drops ended
    trials from the ranking and breaks ties by arrival. Tune does not save schedulers; on
    restore the state is rebuilt from each trial's last result (past a rung = promoted,
    unless the result says it was trained past the rung speculatively).

    ``work_ahead`` keeps workers busy while a rung waits for its last trials, without
    changing a decision: (1) a trial certain to be among the best whatever the missing
    trials bring (its place plus the trials still on the way is within the slots) is
    promoted at once (``eager``); (2) a worker that nothing else needs continues, past its
    rung, a waiting trial currently within the slots (the costliest, then the best placed
    first), up to the epoch before the next rung (or before ``max_t``), and pauses it when
    other work appears; (3) ``candidates`` ranks what could run next by its seconds per
    epoch, learnt from the results of each configuration's repeats (``CostBook``), for
    ``StratifiedScheduler`` to start the costliest first where the longest chain of epochs
    bounds the sweep. Epochs trained past an undecided rung are speculative:
    ``speculation(trial_id)`` says so for the latest result (``SpeculationMarks`` writes it
    into the result). A trial promoted at the rung goes on and its next result is
    unflagged; one that is not is stopped, and its flagged epochs do not count
    (``cae.results.tables.counted_epochs``).
    """

    _supports_buffered_results = False  # one result at a time: pause exactly at a rung

    def __init__(self, time_attr: str = "epoch", metric: str | None = None,
                 mode: str | None = None, max_t: int = 100, grace_period: int = 1,
                 reduction_factor: float = 3, work_ahead: bool = False):
        super().__init__()
        if not (grace_period >= 1 and max_t >= grace_period and reduction_factor > 1):
            raise ValueError("sha needs 1 <= grace_period <= max_t and reduction_factor > 1")
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._max_t, self._rf, self.work_ahead = max_t, reduction_factor, work_ahead
        self.rungs = rungs(grace_period, reduction_factor, max_t)  # epochs
        self._entries: dict[str, _Entry] = {}
        self._num_stopped = 0
        self._deciding = False
        # indexes, so that a decision or a choice does not walk every trial
        n = len(self.rungs) + 1
        self._level: list[dict[str, _Entry]] = [{} for _ in range(n)]  # level -> entries
        self._on_way = [0] * n  # live entries below their level's rung
        self._live = [0] * n  # live entries at each level
        self._errored = [0] * n  # ended by an error (may be retried)
        self._changed = [True] * n  # something arrived or ended at the level
        self._version = [0] * n  # bumped on every change at the level
        self._known_at: list[tuple[int, list, list]] = [(-1, [], [])] * n  # cache
        self._pending, self._promoted = _Queue(), _Promoted()
        self.costs = CostBook()  # StratifiedScheduler shares one between its strata
        # promote certain winners before their rung is complete (not where every worker
        # is busy anyway: StratifiedScheduler turns it off there)
        self.eager = True
        self._marks: dict[str, tuple[int, float]] = {}

    set_search_properties = _agree

    # ---- state ------------------------------------------------------------------------

    def _waiting(self, e: _Entry) -> bool:
        return not e.ended and e.level < len(self.rungs) and e.epoch >= self.rungs[e.level]

    def _on_the_way(self, e: _Entry) -> bool:
        return not e.ended and e.level < len(self.rungs) and e.epoch < self.rungs[e.level]

    def _set(self, e: _Entry, **changes) -> None:
        """Change an entry's epoch, level, ended or errored, keeping the indexes."""
        self._count(e, -1)
        for key, value in changes.items():
            setattr(e, key, value)
        self._count(e, +1)

    def _count(self, e: _Entry, sign: int) -> None:
        if sign < 0:
            self._level[e.level].pop(e.trial.trial_id, None)
        else:
            self._level[e.level][e.trial.trial_id] = e
            if e.ended:
                self._promoted.discard(e)
        self._on_way[e.level] += sign * self._on_the_way(e)
        self._live[e.level] += sign * (not e.ended)
        self._errored[e.level] += sign * (e.ended and e.errored)
        self._changed[e.level] = True
        self._version[e.level] += 1

    def _rank(self, e: _Entry) -> tuple:
        value = e.score if e.score is not None else e.last
        bad = value is None or not math.isfinite(value)
        sign = 1.0 if self._mode == "min" else -1.0
        return (bad, 0.0 if bad else sign * value, e.config, e.trial.trial_id)

    def _slots(self, k: int) -> int:
        """Trials rung k may still promote: members promoted before (known only after a
        restore, or promoted early as certain) keep theirs."""
        members = sum(len(level) for level in self._level[k:])
        return max(1, math.ceil(members / self._rf)) - (members - len(self._level[k]))

    def _limit(self, e: _Entry) -> int:
        """The last epoch a trial waiting at its rung may train ahead to."""
        nxt = self.rungs[e.level + 1] if e.level + 1 < len(self.rungs) else self._max_t
        return nxt - 1

    # ---- Tune's callbacks -------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError("SyncHalvingScheduler needs a metric and a mode ('min' or "
                             "'max'): pass them here or to tune.TuneConfig()")
        if (e := self._entries.get(trial.trial_id)) is not None:  # retried after a failure
            self._set(e, ended=False, errored=False)  # it keeps its rungs; goes on from its
            self._queue(e)  # checkpoint
            return
        e = self._entries[trial.trial_id] = _Entry(
            trial, len(self._entries), arch_key(trial.config),
            json.dumps(trial.config, sort_keys=True, default=str))
        last = trial.last_result or {}
        e.ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
        if self._time_attr in last and self._metric in last:  # restored: rebuild the state
            e.epoch, e.last = last[self._time_attr], last[self._metric]
            e.level = sum(r < e.epoch for r in self.rungs)  # continued past = promoted
            if last.get(SPECULATIVE) in self.rungs:  # ... unless trained past it ahead
                e.level = self.rungs.index(last[SPECULATIVE])
                e.score = last.get(SPECULATIVE_VALUE, e.last)
            elif self._waiting(e):
                e.score = e.last
            if self._waiting(e) and trial.status == Trial.PENDING:
                keep_paused(trial)  # else Tune would start it past its undecided rung
        self._count(e, +1)
        self._queue(e)

    def _queue(self, e: _Entry) -> None:
        self._pending.push(e, (e.arch, e.level))
        if e.epoch > 0:  # restored or retried with epochs done: may be promoted and paused
            self._promoted.add(e, (e.arch, e.level))

    def _cost(self, group: tuple) -> float:
        """Seconds per epoch of a trial of ``group`` (architecture, level), for the order
        trials start in (``work_ahead``): the costliest first; 0 without: creation order."""
        return self.costs.cost(group[0]) if self.work_ahead else 0.0

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        e = self._entries[trial.trial_id]
        self._marks.pop(trial.trial_id, None)
        self._promoted.discard(e)  # it runs
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        self._set(e, epoch=result[self._time_attr])
        e.last = result[self._metric]
        if "time_this_iter_s" in result:
            self.costs.see(e.arch, result["time_this_iter_s"])
        if e.epoch >= self._max_t:
            return TrialScheduler.STOP
        while (e.level < len(self.rungs) and e.epoch > self.rungs[e.level]
               and not (self.work_ahead and e.score is not None)):
            # past a rung it was not decided at: a trial that went on from a checkpoint
            # newer than the state this run was restored from; it went on, so it had been
            # promoted (as on_trial_add reads a restored trial). Working ahead, a trial
            # whose value at the rung is known may be past it ahead of the decision: the
            # rung, decided again on the same values, says
            self._set(e, level=e.level + 1)
            e.score = None
        if self._waiting(e) and e.score is None:
            e.score = e.last
            self._version[e.level] += 1
        self._decide(tune_controller, current=trial)
        if e.level < len(self.rungs) and e.epoch > self.rungs[e.level] and e.score is not None:
            # past a rung it was not promoted through: waiting there, or stopped there while
            # training ahead (Ray can still deliver the epoch it was training): this epoch
            # does not count unless a promotion at the rung confirms it
            self._marks[trial.trial_id] = (self.rungs[e.level], e.score)
        if e.ended:
            return TrialScheduler.STOP
        if not self._waiting(e):
            return TrialScheduler.CONTINUE
        if (self.work_ahead and e.epoch < self._limit(e) and "stop_reason" not in result
                and self._place(e) < self._slots(e.level)):
            return TrialScheduler.CONTINUE  # trains ahead (see the class docstring)
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict | None = None) -> None:
        e = self._entries[trial.trial_id]
        changes = {"ended": True}  # competes with its last value
        if result and self._time_attr in result and self._metric in result:
            changes["epoch"], e.last = result[self._time_attr], result[self._metric]
        self._set(e, **changes)
        self._decide(tune_controller)

    on_trial_remove = on_trial_complete

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        # no decision now: a trial to be retried is added again right after this call;
        # the next choose_trial_to_run decides
        self._set(self._entries[trial.trial_id], ended=True, errored=True)

    def speculation(self, trial_id: str) -> tuple[int, float] | None:
        """(rung epoch, value there) if the trial's latest result was trained past a rung
        not decided yet (``work_ahead``), else None."""
        return self._marks.get(trial_id)

    def is_ahead(self, trial: Trial) -> bool:
        """Whether the trial is training past an undecided rung right now."""
        e = self._entries.get(trial.trial_id)
        return e is not None and self._waiting(e)

    # ---- decisions --------------------------------------------------------------------

    def _decide(self, tune_controller, current: Trial | None = None) -> None:
        """Decide every rung whose population has all arrived (idempotent, not re-entrant:
        stopping a trial calls back into the scheduler)."""
        if self._deciding or not _search_finished(tune_controller):
            return
        self._deciding = True
        try:
            for k in range(len(self.rungs)):
                if self._on_way[k]:  # someone is still on the way to this rung
                    if self.work_ahead and self.eager and self._changed[k]:
                        self._promote_certain(k)
                    return
                if not self._live[k]:
                    continue  # decided (or empty)
                self._changed[k] = False
                at_rung = sorted(self._level[k].values(), key=self._rank)
                keep = {e.trial.trial_id for e in at_rung[:max(0, self._slots(k))]}
                losers = []
                for e in at_rung:
                    if e.ended:
                        continue
                    if e.trial.trial_id in keep:
                        self._promote(e, k)
                    else:
                        self._set(e, ended=True)
                        losers.append(e.trial)
                self._num_stopped += len(losers)
                for trial in losers:
                    if trial is not current and trial.status not in (Trial.TERMINATED, Trial.ERROR):
                        tune_controller.stop_trial(trial)  # PAUSED, RUNNING, saving, PENDING
                        mark_for_experiment_state(tune_controller, trial)
        finally:
            self._deciding = False

    def _promote(self, e: _Entry, k: int) -> None:
        self._set(e, level=k + 1)
        e.score = None
        self._promoted.add(e, (e.arch, e.level))  # to run when paused (or pending, restored)

    def _known(self, k: int) -> list[_Entry]:
        """Entries at rung k whose value there is final, best first (cached)."""
        return self._known_ranked(k)[1]

    def _known_ranked(self, k: int) -> tuple[list, list[_Entry]]:
        version, ranks, entries = self._known_at[k]
        if version != self._version[k]:
            known = sorted(((self._rank(e), e) for e in self._level[k].values()
                            if (e.ended and not e.errored) or self._waiting(e)),
                           key=lambda x: x[0])
            ranks, entries = [r for r, _ in known], [e for _, e in known]
            self._known_at[k] = (self._version[k], ranks, entries)
        return ranks, entries

    def _place(self, e: _Entry) -> int:
        """How many known entries at the trial's rung rank above it."""
        return bisect.bisect_left(self._known_ranked(e.level)[0], self._rank(e))

    def _promote_certain(self, k: int) -> None:
        """Promote the waiting trials of rung k that the missing ones cannot push out."""
        self._changed[k] = False
        slots = self._slots(k)
        unknown = self._on_way[k] + self._errored[k]
        if unknown >= slots:
            return
        for i, e in enumerate(self._known(k)):
            if i + unknown >= slots:
                break
            if not e.ended:
                self._marks.pop(e.trial.trial_id, None)
                self._promote(e, k)

    # ---- what runs next ---------------------------------------------------------------

    def _is_promoted(self, e: _Entry) -> bool:
        return (not e.ended and not self._waiting(e) and (
            e.trial.status == Trial.PAUSED or (e.trial.status == Trial.PENDING and e.epoch > 0)))

    def _is_pending(self, e: _Entry) -> bool:
        return e.trial.status == Trial.PENDING and not e.ended and not self._waiting(e)

    def candidates(self, tune_controller, ahead: bool = True) -> dict[str, tuple]:
        """What this stratum could run next, by kind: ``promoted`` (paused past a decided
        rung), ``pending`` (not started), ``ahead`` (waiting at a rung, trained ahead if no
        other work: ``work_ahead``), each as (priority, trial), lower first. Also decides
        rungs that became complete when the search ended."""
        self._decide(tune_controller)
        out = {}
        for kind, queue, ok in (("promoted", self._promoted, self._is_promoted),
                                ("pending", self._pending, self._is_pending)):
            if (found := queue.peek(ok, self._cost)) is not None:
                out[kind] = (found[0], found[1].trial)
        if ahead and self.work_ahead and (best := self._ahead_candidate()) is not None:
            out["ahead"] = best
        return out

    def _ahead_candidate(self) -> tuple | None:
        """The paused trial to train ahead: within its rung's slots now, costliest first
        (the slowest trials are the ones a sweep waits for), then the best placed."""
        best = None
        for k in range(len(self.rungs)):
            slots = self._slots(k)
            for i, e in enumerate(self._known(k)[:max(0, slots)]):
                if (not e.ended and e.trial.status == Trial.PAUSED
                        and e.epoch < self._limit(e)):
                    key = (-self.costs.cost(e.arch), i / slots, e.order)
                    if best is None or key < best[0]:
                        best = (key, e.trial)
        return best

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Promoted paused trials first, then new ones, then (``work_ahead``) one to train
        ahead; a paused trial waiting at an undecided rung is not run otherwise."""
        found = self.candidates(tune_controller)
        for kind in ("promoted", "pending", "ahead"):
            if kind in found:
                return found[kind][1]
        return None

    def debug_string(self) -> str:
        waiting = sum(map(self._waiting, self._entries.values()))
        return f"SyncHalving: rungs {self.rungs}, {waiting} waiting, {self._num_stopped} stopped"

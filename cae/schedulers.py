"""Early stopping that does not decide a sweep by trial order.

Ray's ASHA promotes whichever trial reaches an empty rung first, so the grid's first values
win. Remedies: ``StratifiedScheduler`` halves separately per stratum (e.g. per
``model.latent_dim``), so each stratum's best trains to the end; ``SyncHalvingScheduler``
(``kind: sha``) decides a rung only when the whole stratum has reached it, independent of
order; ``shuffled_search`` starts grid trials in a seeded shuffled order.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import json
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.variant_generator import generate_variants

from cae.config import REPEAT_KEY
from cae.ray_internals import keep_paused, mark_for_experiment_state
from cae.spec import rungs, stratum_of  # noqa: F401 (re-exported)


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
    (``cae.results.counted_epochs``).
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


# ---- one scheduler per stratum ----------------------------------------------------------


class _StratumView:
    """The controller as one stratum's scheduler sees it: only that stratum's trials."""

    def __init__(self, controller, trials: list[Trial]):
        self._controller, self._trials = controller, trials

    def get_trials(self) -> list[Trial]:
        return self._trials

    def __getattr__(self, name: str):
        return getattr(self._controller, name)


class StratifiedScheduler(TrialScheduler):
    """One scheduler per stratum (``stratum_of(trial.config, stratify)``), made lazily by a
    picklable ``factory``; every callback goes to the trial's stratum's scheduler, so trials
    of different strata are never compared. No stratify keys: a single stratum. The same
    metric/mode here and in ``tune.TuneConfig`` agree (Ray's own schedulers refuse both)."""

    # With work ahead, what runs next (``_rank``): with many trials per worker the sweep is
    # bound by throughput, and plain SHA's order serves it (stratum by stratum, so that
    # strata finish one after the other and their last epochs overlap the others' work);
    # no early promotions there (``eager``): every worker is busy anyway, and promoting
    # early would only reorder the work; with few it is bound by its longest chain of
    # epochs: new trials first (a rung waits for every trial of its stratum), then promoted
    # ones, each costliest first over all strata. Last, a trial to train ahead
    # (``SyncHalvingScheduler``).
    KINDS = ("pending", "promoted", "ahead")
    TRIALS_PER_WORKER = 6

    def __init__(self, factory: Callable[[], TrialScheduler], stratify: Sequence[str] = (),
                 metric: str | None = None, mode: str | None = None):
        super().__init__()
        self._factory, self._keys = factory, list(stratify)
        self._metric, self._mode, self._spec = metric, mode, {}
        self._supports_buffered_results = factory().supports_buffered_results
        self._strata: dict[tuple, TrialScheduler] = {}
        self._members: dict[tuple, list[Trial]] = {}
        self._stratum: dict[str, tuple] = {}
        self._costs = CostBook()
        self._workers = 0  # the most trials seen running at once (work ahead)
        self._calls = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if not _agree(self, metric, mode):
            return False
        self._spec = spec
        return all(s.set_search_properties(self._metric, self._mode, **spec)
                   for s in self._strata.values())

    def _call(self, method: str, controller, trial: Trial, *args):
        key = self._stratum[trial.trial_id]
        view = _StratumView(controller, self._members[key])
        return getattr(self._strata[key], method)(view, trial, *args)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        again = trial.trial_id in self._stratum  # a retried trial is added again
        key = self._stratum[trial.trial_id] = stratum_of(trial.config, self._keys)
        if key not in self._strata:
            self._strata[key], self._members[key] = self._factory(), []
            if hasattr(self._strata[key], "costs"):
                self._strata[key].costs = self._costs  # what an epoch costs, learnt once
            self._strata[key].set_search_properties(self._metric, self._mode, **self._spec)
        self._members[key] += [] if again else [trial]
        self._call("on_trial_add", tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = self._call("on_trial_result", tune_controller, trial, result)
        sub = self._strata[self._stratum[trial.trial_id]]
        if (decision == TrialScheduler.CONTINUE and getattr(sub, "work_ahead", False)
                and sub.is_ahead(trial) and self._other_work(tune_controller)):
            decision = TrialScheduler.PAUSE  # work ahead only where nothing else can run
        return decision

    def _rank(self, kind: str, index: int, priority: tuple, bound: bool) -> tuple:
        """Where a stratum's candidate of ``kind`` goes (lower first); ``index``: the
        stratum's place in the order strata appeared; ``priority``: (-seconds per epoch,
        creation order) from ``SyncHalvingScheduler.candidates``."""
        if kind == "ahead":
            return (math.inf, 0, priority)
        if bound:  # plain SHA's order: stratum by stratum, promoted first, creation order
            return (index, kind != "promoted", priority[1:])
        return (self.KINDS.index(kind), 0, priority)

    def _throughput_bound(self, tune_controller) -> bool:
        """Whether the sweep has many trials per worker (workers: the most trials seen
        running at once, counted now and then: a cluster may grow)."""
        self._calls += 1
        if self._calls < 64 or self._calls % 64 == 0:
            running = sum(t.status == Trial.RUNNING for t in tune_controller.get_trials())
            self._workers = max(self._workers, running)
        return bool(self._workers) and len(self._stratum) > self.TRIALS_PER_WORKER * self._workers

    def _other_work(self, tune_controller) -> bool:
        """Whether some stratum has a promoted or a new trial waiting for a worker."""
        for key, sub in self._strata.items():
            if getattr(sub, "work_ahead", False):
                found = sub.candidates(_StratumView(tune_controller, self._members[key]),
                                       ahead=False)
                if "promoted" in found or "pending" in found:
                    return True
        return False

    def speculation(self, trial_id: str) -> tuple[int, float] | None:
        """See ``SyncHalvingScheduler.speculation``."""
        key = self._stratum.get(trial_id)
        sub = self._strata.get(key)
        return sub.speculation(trial_id) if hasattr(sub, "speculation") else None

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._call("on_trial_complete", tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._call("on_trial_error", tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._call("on_trial_remove", tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Every stratum's choice (SHA decides rungs there too), the first in stratum order;
        with ``work_ahead`` (``SyncHalvingScheduler.candidates``): by ``KINDS``, the best
        candidate over all strata."""
        chosen, best, bound = None, None, None
        for index, (key, sub) in enumerate(self._strata.items()):
            view = _StratumView(tune_controller, self._members[key])
            if getattr(sub, "work_ahead", False):
                bound = self._throughput_bound(tune_controller) if bound is None else bound
                sub.eager = not bound
                for kind, (priority, trial) in sub.candidates(view).items():
                    rank = self._rank(kind, index, priority, bound)
                    if best is None or rank < best[0]:
                        best = (rank, trial)
            else:
                chosen = chosen or sub.choose_trial_to_run(view)
        if chosen is None and best is not None:
            chosen = best[1]
        blocked = chosen is None and not _search_finished(tune_controller)
        status = {t.status for t in tune_controller.get_trials()} if blocked else set()
        if Trial.PAUSED in status and status <= {Trial.PAUSED, Trial.TERMINATED, Trial.ERROR}:
            raise RuntimeError(  # would wait forever: fail with the reason instead
                "every unfinished trial is paused at a rung, waiting for trials the search "
                "algorithm does not create; paused trials count against max_concurrent_trials, "
                "so with sha limit concurrency with resources per trial instead")
        return chosen

    def debug_string(self) -> str:
        lines = [f"Stratified by {', '.join(self._keys) or '(one stratum)'}:"]
        lines += [f"  {k}: {s.debug_string()}" for k, s in self._strata.items()]
        return "\n".join(lines)


def make_scheduler(kind: str, stratify: Sequence[str] = (), *, max_t: int, grace_period: int,
                   reduction_factor: float, metric: str = "val_loss", mode: str = "min",
                   time_attr: str = "epoch", work_ahead: bool = False) -> TrialScheduler:
    """The scheduler of a sweep: ``asha`` (Ray's ASHA) or ``sha`` (synchronous; with
    ``work_ahead``, see ``SyncHalvingScheduler``) per stratum of ``stratify``, or ``fifo``
    (every trial to the end; stratify does not matter)."""
    if kind == "fifo":
        return FIFOScheduler()
    cls = {"asha": ASHAScheduler, "sha": SyncHalvingScheduler}.get(kind)
    if cls is None:
        raise ValueError(f"scheduler.kind: {kind!r} is not one of asha, sha, fifo")
    extra = {"work_ahead": work_ahead} if kind == "sha" else {}
    factory = functools.partial(cls, time_attr=time_attr, max_t=max_t,
                                grace_period=grace_period, reduction_factor=reduction_factor,
                                **extra)
    return StratifiedScheduler(factory, stratify, metric=metric, mode=mode)


class SpeculationMarks(Callback):
    """Writes into a result trained ahead of an undecided rung (``work_ahead``) the rung's
    epoch (``speculative``) and the trial's value there (``speculative_rung_value``), before
    Ray Tune's loggers write it: the scheduler runs first and says so (``speculation``)."""

    def __init__(self, scheduler: TrialScheduler):
        self.scheduler = scheduler

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict,
                        **info) -> None:
        mark = getattr(self.scheduler, "speculation", lambda _: None)(trial.trial_id)
        if mark is not None:
            result[SPECULATIVE], result[SPECULATIVE_VALUE] = mark


def speculation_marks(scheduler: TrialScheduler) -> SpeculationMarks:
    """The callback a sweep with ``scheduler`` adds to its run config."""
    return SpeculationMarks(scheduler)


# ---- grid trials in a seeded shuffled order ---------------------------------------------


class ShuffledSearcher(Searcher):
    """Hands out a fixed list of trial configs in order (see ``shuffled_search``); Tune
    saves its state in the experiment directory, so ``Tuner.restore`` goes on from there."""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self._configs, self._next = configs, 0

    def suggest(self, trial_id: str) -> dict | None:
        if self._next >= len(self._configs):
            return Searcher.FINISHED
        self._next += 1
        return self._configs[self._next - 1]

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass  # the list is fixed: results do not change what comes next

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump((self._configs, self._next), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self._configs, self._next = pickle.load(f)


class ShuffledSearch(NamedTuple):
    """What ``tune.Tuner`` needs: ``param_space=param_space`` (empty: the searcher owns the
    space), ``tune.TuneConfig(search_alg=search_alg, num_samples=num_samples)``."""

    search_alg: ShuffledSearcher
    param_space: dict
    num_samples: int  # trials in all: grid points x repeats


def shuffled_search(param_space: dict, num_samples: int, seed: int) -> ShuffledSearch:
    """Every grid point ``num_samples`` times, random axes sampled, in a seeded random order.

    Ray's own variant generation (``generate_variants``, as the default search uses) expands
    the grid and samples ``tune.uniform`` & co. with a generator seeded by ``seed``; the
    whole list is then shuffled with it, so the same seed gives the same trials in the same
    order. Each trial's ``config`` is the resolved point: the same flat dotted keys (lists
    and ``variant*`` mappings as values) as without shuffling.

    Trade-off: a custom searcher, as Ray's BasicVariantGenerator cannot shuffle and its
    ``points_to_evaluate`` breaks on list- or dict-valued grid values. The list is built up
    front (memory grows with the trials); Ray keeps one trial pending at a time for a custom
    searcher (unless ``max_concurrent_trials`` or ``TUNE_MAX_PENDING_TRIALS_PG`` says
    otherwise), slowing the start of a big cluster sweep; trial names list every key.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1 (got {num_samples})")
    rng = np.random.default_rng(seed)
    # Over a grid, the repeats of a point differ by their ``repeat`` (and so by their seed,
    # see ``cae.config.trial_config``).
    configs = [{**spec, REPEAT_KEY: r} if num_samples > 1 else spec
               for r in range(num_samples)
               for _, spec in generate_variants(param_space, random_state=rng)]
    order = rng.permutation(len(configs))
    return ShuffledSearch(ShuffledSearcher([configs[i] for i in order]), {}, len(configs))

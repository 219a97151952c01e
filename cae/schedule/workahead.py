"""Working ahead (``scheduler.work_ahead``, ``sha``'s default): synchronous successive
halving that keeps workers busy while a rung waits for its last trials, without changing any
decision of ``SyncHalvingScheduler``.

(1) A trial certain to be among the best whatever the missing trials bring (its place plus
the trials still on the way is within the slots) is promoted at once (``promote_early``).
(2) A worker that nothing else needs continues, past its rung, a waiting trial currently
within the slots (the costliest, then the best placed first), up to the epoch before the
next rung (or before ``max_t``), and pauses it when other work appears. (3) ``candidates``
ranks what could run next by its seconds per epoch, learnt from the results of each
configuration's repeats (``CostBook``), for ``StratifiedScheduler`` to start the costliest
first where the longest chain of epochs bounds the sweep.

Epochs trained past an undecided rung are speculative: ``speculation(trial_id)`` says so for
the latest result (``SpeculationMarks`` writes it into the result). A trial promoted at the
rung goes on and its next result is unflagged; one that is not is stopped, and its flagged
epochs do not count (``cae.results.tables.counted_epochs``).
"""

from __future__ import annotations

import bisect
import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from cae.schedule.halving import SyncHalvingScheduler
from cae.schedule.rungbook import Entry, RungBook


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


class AheadBook(RungBook):
    """A rung book that also knows, before a rung is complete, the trials whose value there
    is final, best first: the certain winners among them, and each one's place."""

    def __init__(self, rungs: list[int], reduction_factor: float, mode: str | None = None):
        super().__init__(rungs, reduction_factor, mode)
        n = len(rungs) + 1
        self._errored = [0] * n  # ended by an error (may be retried)
        self._changed = [True] * n  # something arrived or ended at the level
        self._version = [0] * n  # bumped on every change at the level
        self._known_at: list[tuple[int, list, list]] = [(-1, [], [])] * n  # cache

    def _count(self, e: Entry, sign: int) -> None:
        super()._count(e, sign)
        self._errored[e.level] += sign * (e.ended and e.errored)
        self._changed[e.level] = True
        self._version[e.level] += 1

    def _promoted_past(self, e: Entry) -> bool:
        # a trial whose value at the rung is known may be past it ahead of the decision:
        # the rung, decided again on the same values, says
        return e.score is None

    def known(self, k: int) -> list[Entry]:
        """Entries at rung k whose value there is final, best first (cached)."""
        return self._known_ranked(k)[1]

    def _known_ranked(self, k: int) -> tuple[list, list[Entry]]:
        version, ranks, entries = self._known_at[k]
        if version != self._version[k]:
            known = sorted(((self.rank(e), e) for e in self._level[k].values()
                            if (e.ended and not e.errored) or self.waiting(e)),
                           key=lambda x: x[0])
            ranks, entries = [r for r, _ in known], [e for _, e in known]
            self._known_at[k] = (self._version[k], ranks, entries)
        return ranks, entries

    def place(self, e: Entry) -> int:
        """How many known entries at the trial's rung rank above it."""
        return bisect.bisect_left(self._known_ranked(e.level)[0], self.rank(e))

    def promote_certain(self, k: int) -> list[Entry]:
        """Promote the waiting trials of rung k that the missing ones cannot push out; none
        unless something arrived or ended at the level since the last call."""
        if not self._changed[k]:
            return []
        self._changed[k] = False
        slots = self.slots(k)
        unknown = self._on_way[k] + self._errored[k]
        if unknown >= slots:
            return []
        promoted = []
        for i, e in enumerate(self.known(k)):
            if i + unknown >= slots:
                break
            if not e.ended:
                self.promote(e, k)
                promoted.append(e)
        return promoted


class WorkAheadScheduler(SyncHalvingScheduler):
    """``SyncHalvingScheduler`` (the same arguments) working ahead: see the module
    docstring."""

    work_ahead = True
    book_class = AheadBook

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._costs = CostBook()  # StratifiedScheduler shares one between its strata
        self._eager = True  # promote certain winners before their rung is complete
        self._marks: dict[str, tuple[int, float]] = {}  # trial id -> speculation

    def share_costs(self, costs: CostBook) -> None:
        """Learn and read seconds per epoch in ``costs``: one book for all strata."""
        self._costs = costs

    def promote_early(self, on: bool) -> None:
        """Whether certain winners are promoted before their rung is complete: not where
        every worker is busy anyway (``StratifiedScheduler`` says), since promoting early
        would only reorder the work."""
        self._eager = on

    def _cost(self, group: tuple) -> float:
        """The costliest first: the slowest trials are the ones a sweep waits for."""
        return self._costs.cost(group[0])

    def _limit(self, e: Entry) -> int:
        """The last epoch a trial waiting at its rung may train ahead to."""
        nxt = self.rungs[e.level + 1] if e.level + 1 < len(self.rungs) else self._max_t
        return nxt - 1

    # ---- Tune's callbacks -------------------------------------------------------------

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        e = self._book.entries[trial.trial_id]
        self._marks.pop(trial.trial_id, None)
        if (self._time_attr in result and self._metric in result
                and "time_this_iter_s" in result):
            self._costs.see(e.arch, result["time_this_iter_s"])
        return super().on_trial_result(tune_controller, trial, result)

    def _decision(self, e: Entry, result: dict) -> str:
        if e.level < len(self.rungs) and e.epoch > self.rungs[e.level] and e.score is not None:
            # past a rung it was not promoted through: waiting there, or stopped there while
            # training ahead (Ray can still deliver the epoch it was training): this epoch
            # does not count unless a promotion at the rung confirms it
            self._marks[e.trial_id] = (self.rungs[e.level], e.score)
        if (self._book.waiting(e) and e.epoch < self._limit(e) and "stop_reason" not in result
                and self._book.place(e) < self._book.slots(e.level)):
            return TrialScheduler.CONTINUE  # trains ahead
        return super()._decision(e, result)

    def _incomplete(self, k: int) -> None:
        if self._eager:
            for e in self._book.promote_certain(k):
                self._marks.pop(e.trial_id, None)
                self._promoted.add(e, (e.arch, e.level))

    def speculation(self, trial_id: str) -> tuple[int, float] | None:
        """(rung epoch, value there) if the trial's latest result was trained past a rung
        not decided yet, else None."""
        return self._marks.get(trial_id)

    def is_ahead(self, trial: Trial) -> bool:
        """Whether the trial is training past an undecided rung right now."""
        e = self._book.entries.get(trial.trial_id)
        return e is not None and self._book.waiting(e)

    # ---- what runs next ---------------------------------------------------------------

    def candidates(self, tune_controller, ahead: bool = True) -> dict[str, tuple]:
        """``SyncHalvingScheduler.candidates``, by seconds per epoch, and with ``ahead``
        also ``ahead``: a trial waiting at a rung, to train ahead if no other work."""
        out = super().candidates(tune_controller)
        if ahead and (best := self._ahead_candidate()) is not None:
            out["ahead"] = best
        return out

    def _ahead_candidate(self) -> tuple | None:
        """The paused trial to train ahead: within its rung's slots now, costliest first
        (the slowest trials are the ones a sweep waits for), then the best placed."""
        best = None
        for k in range(len(self.rungs)):
            slots = self._book.slots(k)
            for i, e in enumerate(self._book.known(k)[:max(0, slots)]):
                if (not e.ended and e.trial.status == Trial.PAUSED
                        and e.epoch < self._limit(e)):
                    key = (-self._costs.cost(e.arch), i / slots, e.order)
                    if best is None or key < best[0]:
                        best = (key, e.trial)
        return best


def sync_halving(*args, work_ahead: bool = False, **kwargs) -> SyncHalvingScheduler:
    """One stratum's scheduler of ``kind: sha`` (the arguments of ``SyncHalvingScheduler``):
    plain, or working ahead. A run made before working ahead had its own class pickled its
    factory as ``SyncHalvingScheduler(..., work_ahead=...)``: its resume calls this
    (``cae.sweep.moved``)."""
    return (WorkAheadScheduler if work_ahead else SyncHalvingScheduler)(*args, **kwargs)

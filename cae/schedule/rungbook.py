"""Successive halving's book of one stratum: where each trial stands (the rungs it passed,
its epoch, its value at the rung it waits at) and, once every trial still on its way to a
rung has reached it, which go on and which stop.

Plain Python, no Ray: ``cae.schedule.halving`` keeps one per stratum and feeds it Ray Tune's
callbacks; ``cae.schedule.workahead`` extends it for working ahead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class Entry:
    """One trial in the book."""

    trial: Any  # Ray Tune's Trial (its trial_id and status)
    order: int  # creation order
    arch: str  # its config but the repeat: what its epochs cost is learnt by
    config: str  # its config as JSON: ties are broken by it
    epoch: float = 0.0
    last: float | None = None  # latest metric value
    score: float | None = None  # value when it reached the rung it waits at
    level: int = 0  # rungs passed (promoted through)
    ended: bool = False  # completed, errored, removed or stopped
    errored: bool = False  # ended by an error: may come back (a retry)

    @property
    def trial_id(self) -> str:
        return self.trial.trial_id


class RungBook:
    """Trials by level (the rungs each passed). Rung k (at epoch ``rungs[k]``) is complete
    when no live trial of level k is below it; then the best ``ceil(n / rf)`` (at least 1)
    of the n trials that reached it go on, the others stop. A trial that ended before the
    rung competes with its last value, then leaves; ties go by the trial's config, never by
    arrival. Trials promoted before (found past a rung on a restore) keep their places."""

    def __init__(self, rungs: list[int], reduction_factor: float, mode: str | None = None):
        self.rungs, self._rf, self._mode = rungs, reduction_factor, mode
        self.entries: dict[str, Entry] = {}
        # counts by level, so that a decision does not walk every trial
        n = len(rungs) + 1
        self._level: list[dict[str, Entry]] = [{} for _ in range(n)]  # level -> entries
        self._on_way = [0] * n  # live entries below their level's rung
        self._live = [0] * n  # live entries at each level

    def rank_by(self, mode: str | None) -> None:
        """``min``: lower values are better; ``max``: higher ones."""
        self._mode = mode

    # ---- where a trial stands -------------------------------------------------------------

    def waiting(self, e: Entry) -> bool:
        """At (or past) the rung of its level, not decided there yet."""
        return not e.ended and e.level < len(self.rungs) and e.epoch >= self.rungs[e.level]

    def on_the_way(self, e: Entry) -> bool:
        return not e.ended and e.level < len(self.rungs) and e.epoch < self.rungs[e.level]

    # ---- what happens to a trial ----------------------------------------------------------

    def add(self, e: Entry) -> None:
        self.entries[e.trial_id] = e
        self._count(e, +1)

    def set(self, e: Entry, **changes) -> None:
        """Change an entry's fields (epoch, values, level, ended, errored), keeping the
        counts."""
        self._count(e, -1)
        for key, value in changes.items():
            setattr(e, key, value)
        self._count(e, +1)

    def _count(self, e: Entry, sign: int) -> None:
        if sign < 0:
            self._level[e.level].pop(e.trial_id, None)
        else:
            self._level[e.level][e.trial_id] = e
        self._on_way[e.level] += sign * self.on_the_way(e)
        self._live[e.level] += sign * (not e.ended)

    def arrive(self, e: Entry) -> None:
        """After a result: past a rung it was not decided at, a trial went on from a
        checkpoint newer than the state the book was rebuilt from, so it had been promoted
        (as a restore reads it); at its rung, its value now is what it is ranked by."""
        while (e.level < len(self.rungs) and e.epoch > self.rungs[e.level]
               and self._promoted_past(e)):
            self.set(e, level=e.level + 1, score=None)
        if self.waiting(e) and e.score is None:
            self.set(e, score=e.last)

    def _promoted_past(self, e: Entry) -> bool:
        """Whether a trial found past its rung's epoch had been promoted through it."""
        return True

    # ---- decisions --------------------------------------------------------------------

    def rank(self, e: Entry) -> tuple:
        """Best first; a missing or non-finite value last; ties by config."""
        value = e.score if e.score is not None else e.last
        bad = value is None or not math.isfinite(value)
        sign = 1.0 if self._mode == "min" else -1.0
        return (bad, 0.0 if bad else sign * value, e.config, e.trial_id)

    def slots(self, k: int) -> int:
        """Trials rung k may still promote: members promoted before (known only after a
        restore, or promoted early as certain) keep theirs."""
        members = sum(len(level) for level in self._level[k:])
        return max(1, math.ceil(members / self._rf)) - (members - len(self._level[k]))

    def complete(self, k: int) -> bool:
        """Whether no live trial is still on its way to rung k."""
        return not self._on_way[k]

    def decide(self, k: int) -> tuple[list[Entry], list[Entry]]:
        """Decide complete rung k: (promoted, stopped); nothing if it was decided (or is
        empty)."""
        if not self._live[k]:
            return [], []
        at_rung = sorted(self._level[k].values(), key=self.rank)
        keep = {e.trial_id for e in at_rung[:max(0, self.slots(k))]}
        promoted, stopped = [], []
        for e in at_rung:
            if e.ended:
                continue
            if e.trial_id in keep:
                self.promote(e, k)
                promoted.append(e)
            else:
                self.set(e, ended=True)
                stopped.append(e)
        return promoted, stopped

    def promote(self, e: Entry, k: int) -> None:
        self.set(e, level=k + 1, score=None)

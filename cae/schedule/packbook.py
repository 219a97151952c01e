"""Fused packs under successive halving, as a book: where each member of a fused sweep stands
(training in a pack, waiting at a rung, queued for a pack, stopped, ended), the decisions
of its stratum's halving on it, and the packs its survivors go on in. Plain Python, no Ray:
``cae.schedule.packed`` keeps one for the sweep and feeds it Ray Tune's callbacks.

Each member is a trial to the halving: its stratum's decider (a ``RungBook`` for ``sha``,
Ray's ASHA for ``asha``) decides for it exactly as for an unfused trial. A pack (one Tune
trial) reports every member each epoch; at a rung the pack ends (``pack_result`` says
stop), its members wait there (``sha``) or are decided at once (``asha``), and the
survivors of all the packs of one architecture (``group``: what may share a pack) and
stratum at one epoch are regrouped into as few packs of near-equal size as ``max_members``
allows, in the members' order, so that who shares a pack follows from the decisions alone.
Each member carries its whole state from pack to pack in its own folder (its checkpoints).

When regroups happen: under ``sha`` at once after a rung is decided (every survivor is known
then); under ``asha`` when a group's survivors at an epoch fill a pack, when no member of the
group can still arrive there, or when a worker would otherwise sit idle (``flush``).
Working ahead (``sha`` with ``work_ahead``): a pack whose members all wait at an undecided
rung, each within the rung's slots, goes on past it when nothing else waits for a worker,
up to the epoch before the next rung; those epochs count once the rung promotes the
members, and if the rung stops one of them the pack ends there and its survivors regroup
(by the epoch they reached), so who shares a pack then depends on timing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cae.schedule.rungbook import Entry
from cae.schedule.workahead import AheadBook

# what a member does next, after a result (``Decider.result``)
CONTINUE, WAIT, STOP = "continue", "wait", "stop"


@dataclass(eq=False)
class Seat:
    """One member of a fused sweep in the book (a trial to the halving: ``trial_id``)."""

    trial_id: str  # the member's id in the book and in its packs' reports
    point: dict  # its search-space point
    group: str  # members of one group may share a pack (``cae.train.packing.pack_key``)
    stratum: tuple  # its halving stratum (``scheduler.stratify``)
    order: int  # its place in the sweep's (shuffled) order
    home: str | None = None  # its folder, relative to the run directory, once it trained
    epoch: int = 0  # the last epoch it reported
    value: float | None = None  # its validation loss then
    fate: str = "queued"  # queued | training | waiting | stopped | ended | failed
    pack: str | None = None  # the Tune trial that trains it (or last trained it)
    failures: int = 0  # packs of it that failed for good (it went on in a new one)

    @property
    def config(self) -> dict:
        return self.point


class Decider(Protocol):
    """One stratum's halving, deciding for members as for trials."""

    def add(self, seat: Seat) -> None: ...

    def result(self, seat: Seat) -> str: ...  # CONTINUE, WAIT or STOP after its epoch

    def ended(self, seat: Seat, errored: bool = False) -> None: ...

    def back(self, seat: Seat) -> None: ...  # retried after its pack failed

    def decide(self) -> tuple[list[Seat], list[Seat]]: ...  # (promoted, stopped) now

    def ahead(self, seat: Seat) -> bool: ...  # may train past its undecided rung now


class SyncDecider:
    """``sha``'s decisions for one stratum: a rung is decided once every member still on its
    way has reached it (``cae.schedule.rungbook``, with ``AheadBook``'s places for working
    ahead); ``max_t`` stops what reaches it."""

    def __init__(self, rungs: list[int], reduction_factor: float, mode: str, max_t: int):
        self.book = AheadBook(rungs, reduction_factor, mode)
        self.rungs, self.max_t = rungs, max_t

    def add(self, seat: Seat) -> None:
        self.book.add(Entry(seat, len(self.book.entries), seat.group,
                            json.dumps(seat.point, sort_keys=True, default=str)))

    def result(self, seat: Seat) -> str:
        e = self.book.entries[seat.trial_id]
        self.book.set(e, epoch=seat.epoch, last=seat.value)
        if seat.epoch >= self.max_t:
            self.book.set(e, ended=True)
            return STOP
        self.book.arrive(e)
        if e.ended:
            return STOP
        return WAIT if self.book.waiting(e) else CONTINUE

    def ended(self, seat: Seat, errored: bool = False) -> None:
        e = self.book.entries[seat.trial_id]
        self.book.set(e, ended=True, errored=errored, epoch=seat.epoch, last=seat.value)

    def back(self, seat: Seat) -> None:
        self.book.set(self.book.entries[seat.trial_id], ended=False, errored=False)

    def decide(self) -> tuple[list[Seat], list[Seat]]:
        promoted, stopped = [], []
        for k in range(len(self.rungs)):
            if not self.book.complete(k):  # someone is still on the way to this rung
                break
            up, out = self.book.decide(k)
            promoted += [e.trial for e in up]
            stopped += [e.trial for e in out]
        return promoted, stopped

    def ahead(self, seat: Seat) -> bool:
        e = self.book.entries[seat.trial_id]
        if not self.book.waiting(e):
            return False
        nxt = self.rungs[e.level + 1] if e.level + 1 < len(self.rungs) else self.max_t
        return e.epoch < nxt - 1 and self.book.place(e) < self.book.slots(e.level)


def chunks(items: list, max_members: int) -> list[list]:
    """``items`` cut into the fewest consecutive packs of at most ``max_members``, of
    near-equal sizes (10 at 8 per pack: 5 and 5, not 8 and 2)."""
    if not items:
        return []
    n = math.ceil(len(items) / max_members)
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for j in range(n):
        end = start + size + (j < extra)
        out.append(items[start:end])
        start = end
    return out


class PackBook:
    """The members of a fused sweep under halving, their deciders (one per stratum, made by
    ``decider(stratum)``) and their packs. ``first``: the packs the sweep starts with (lists
    of member ids), handed out first; ``sync``: regroup at decisions (``sha``), else when
    a group's survivors may gather no more (``asha``)."""

    def __init__(self, seats: list[Seat], first: list[list[str]], max_members: int,
                 rungs: list[int], decider: Callable[[tuple], Decider], sync: bool,
                 work_ahead: bool = False, max_failures: int = 0):
        self.seats = {s.trial_id: s for s in seats}
        self.max_failures = max_failures
        self.formed: list[list[str]] = [list(p) for p in first]  # packs to hand out, in order
        self.packs: dict[str, list[str]] = {}  # Tune trial id -> its members
        self.max_members, self.rungs, self.sync = max_members, rungs, sync
        self.work_ahead = work_ahead and sync
        self.deciders: dict[tuple, Decider] = {}
        for seat in seats:
            if seat.stratum not in self.deciders:
                self.deciders[seat.stratum] = decider(seat.stratum)
            self.deciders[seat.stratum].add(seat)

    def _decider(self, seat: Seat) -> Decider:
        return self.deciders[seat.stratum]

    # ---- the searcher's side: the packs to train ----------------------------------------

    def next_pack(self, pack_id: str) -> dict | None:
        """The config of the next pack to train (``cae.run.packfiles``), now Tune trial
        ``pack_id``; None when none is formed."""
        if not self.formed:
            return None
        ids = self.formed.pop(0)
        self.packs[pack_id] = ids
        seats = [self.seats[i] for i in ids]
        for seat in seats:
            seat.fate, seat.pack = "training", pack_id
        config = {"pack": [s.point for s in seats], "ids": ids}
        if any(s.home for s in seats):
            config.update(homes=[s.home for s in seats], epoch=seats[0].epoch)
        return config

    def finished(self) -> bool:
        """Whether no member will train again."""
        return not self.formed and all(s.fate in ("stopped", "ended", "failed")
                                       for s in self.seats.values())

    # ---- the scheduler's side: a pack's results ------------------------------------------

    def pack_result(self, pack_id: str, reports: dict[str, dict], idle: bool = False
                    ) -> tuple[bool, list[Seat], list[str]]:
        """A pack's epoch (each member's metrics by id). Returns whether the pack stops,
        the members the halving stopped now (in any pack), and the other packs that must
        stop because a member of theirs was stopped while training ahead. ``idle``: nothing
        else waits for a worker (a pack may then train ahead)."""
        decisions, arrived = {}, False
        for mid, r in reports.items():
            seat = self.seats.get(mid)
            if seat is None or seat.fate in ("stopped", "ended"):
                continue  # a stale report (a restart reporting again)
            seat.home = r.get("home") or seat.home
            new = int(r["epoch"]) > seat.epoch
            seat.epoch, seat.value = int(r["epoch"]), _value(r)
            if r.get("stop_reason"):  # its own end (max_epochs, patience, diverged)
                seat.fate = "ended"
                self._decider(seat).ended(seat)
                decisions[mid] = "ended"
                continue
            decisions[mid] = self._decider(seat).result(seat)
            arrived |= new and seat.epoch in self.rungs
        promoted, stopped = self._decide()
        stopped += [self.seats[m] for m, d in decisions.items() if d == STOP]
        training = [s for s in stopped if s.fate == "training"]  # in a pack that trains on
        others = sorted({s.pack for s in training if s.pack != pack_id})
        for seat in stopped:
            seat.fate = "stopped"
        live = [self.seats[m] for m in self.packs.get(pack_id, [])
                if self.seats[m].fate == "training"]
        stop = any(d == STOP for d in decisions.values()) or any(
            s.pack == pack_id for s in training)
        if not stop and (arrived or WAIT in decisions.values()):  # at or past a rung
            stop = not (self.work_ahead and idle and live and all(
                decisions.get(s.trial_id) == WAIT and self._decider(s).ahead(s)
                for s in live))
        if stop:
            self._leave(pack_id)
        for other in others:
            self._leave(other)
        self._form()
        return stop, stopped, others

    def pack_ended(self, pack_id: str, errored: bool = False) -> None:
        """A pack's Tune trial ended (complete, stopped, removed), or failed: its members fail
        with it, until it is retried (Tune retries right after, so nothing is decided on a
        failure: ``settle`` decides once nothing else can run)."""
        if errored:
            for mid in self.packs.get(pack_id, []):
                seat = self.seats[mid]
                if seat.fate == "training" and seat.pack == pack_id:
                    seat.fate = "failed"
                    self._decider(seat).ended(seat, errored=True)
            return
        self._leave(pack_id)
        self._decide_and_form()

    def pack_failed(self, pack_id: str) -> None:
        """A pack failed for good (Tune retries a trial up to ``max_failures`` times, but not
        one whose worker's death it hears of twice): its members, whose state is in their
        folders, go on in a new pack, each up to ``max_failures`` times; past that they
        fail."""
        for mid in self.packs.get(pack_id, []):
            seat = self.seats[mid]
            if seat.fate == "failed" and seat.pack == pack_id and (
                    seat.failures < self.max_failures):
                seat.failures += 1
                seat.fate = "queued"
                self._decider(seat).back(seat)
        self._decide_and_form()

    def pack_back(self, pack_id: str) -> None:
        """A failed pack retried: its members train in it again."""
        for mid in self.packs.get(pack_id, []):
            seat = self.seats[mid]
            if seat.fate == "failed" and seat.pack == pack_id:
                seat.fate = "training"
                self._decider(seat).back(seat)

    def flush(self) -> None:
        """A worker would sit idle: every queued member goes into a pack now."""
        self._form(everything=True)

    def settle(self) -> None:
        """Decide what can be decided and regroup (after a restore, say)."""
        self._decide_and_form()

    # ---- within ----------------------------------------------------------------------------

    def _decide_and_form(self) -> None:
        _, stopped = self._decide()
        for seat in stopped:
            seat.fate = "stopped"
        self._form()

    def _decide(self) -> tuple[list[Seat], list[Seat]]:
        promoted, stopped = [], []
        for decider in self.deciders.values():
            up, out = decider.decide()
            promoted += up
            stopped += out
        for seat in promoted:
            if seat.fate == "waiting":
                seat.fate = "queued"
        return promoted, stopped

    def _leave(self, pack_id: str) -> None:
        """The pack's members still training leave it: to wait at their rung, or queued."""
        for mid in self.packs.get(pack_id, []):
            seat = self.seats[mid]
            if seat.fate == "training" and seat.pack == pack_id:
                waiting = self._waits(seat)
                seat.fate = "waiting" if waiting else "queued"

    def _waits(self, seat: Seat) -> bool:
        decider = self._decider(seat)
        return isinstance(decider, SyncDecider) and decider.book.waiting(
            decider.book.entries[seat.trial_id])

    def _form(self, everything: bool = False) -> None:
        """Queued members into packs: each (group, stratum, epoch) pool in the members'
        order, as few packs of near-equal size as ``max_members`` allows."""
        pools: dict[tuple, list[Seat]] = {}
        in_formed = {m for p in self.formed for m in p}
        for seat in sorted(self.seats.values(), key=lambda s: s.order):
            if seat.fate == "queued" and seat.trial_id not in in_formed:
                pools.setdefault((seat.group, seat.stratum, seat.epoch), []).append(seat)
        for key, seats in pools.items():
            if everything or self.sync or len(seats) >= self.max_members or self._gathered(
                    key, in_formed):
                sizes = [len(c) for c in chunks(seats, self.max_members)]
                if not (everything or self.sync or self._gathered(key, in_formed)):
                    sizes = [self.max_members] * (len(seats) // self.max_members)  # full ones
                start = 0
                for size in sizes:
                    self.formed.append([s.trial_id for s in seats[start:start + size]])
                    start += size

    def _gathered(self, key: tuple, in_formed: set[str]) -> bool:
        """Whether no member of the pool's group and stratum can still arrive at its epoch."""
        group, stratum, epoch = key
        return not any(
            s.group == group and s.stratum == stratum and s.epoch < epoch
            and (s.fate in ("training", "waiting") or s.trial_id in in_formed
                 or s.fate == "queued")
            for s in self.seats.values())


def _value(report: dict) -> float | None:
    value = report.get("val_loss")
    return None if value is None else float(value)

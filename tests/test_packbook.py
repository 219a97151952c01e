"""The book of fused packs under halving (``cae.schedule.packbook``) on its own: which packs
it forms, when, and what a pack's results do to it, with made-up losses."""

from ray.tune.schedulers import ASHAScheduler

from cae.schedule.packbook import PackBook, Seat, SyncDecider
from cae.schedule.packed import AsyncDecider, fates


def _book(n: int, max_members: int, rungs: list[int], max_t: int, rf: float = 2,
          kind: str = "sha", work_ahead: bool = False, first: list[list[str]] | None = None
          ) -> PackBook:
    seats = [Seat(f"m{i}", {"lr": i}, "g", (), i) for i in range(n)]
    ids = [s.trial_id for s in seats]
    first = first or [ids[i:i + max_members] for i in range(0, n, max_members)]
    if kind == "sha":
        def decider(_):
            return SyncDecider(rungs, rf, "min", max_t)
    else:
        def decider(_):
            return AsyncDecider(ASHAScheduler(time_attr="epoch", metric="val_loss", mode="min",
                                              max_t=max_t, grace_period=rungs[0],
                                              reduction_factor=rf))
    return PackBook(seats, first, max_members, rungs, decider, sync=kind == "sha",
                    work_ahead=work_ahead)


def _report(book: PackBook, pack: str, epoch: int, values: dict[str, float], idle=False,
            **extra):
    reports = {m: {"epoch": epoch, "val_loss": v, "home": f"p/{m}", **extra}
               for m, v in values.items()}
    return book.pack_result(pack, reports, idle=idle)


def test_a_rung_waits_for_every_pack_then_regroups_the_survivors_into_one():
    book = _book(6, 2, [1, 3], max_t=4)
    packs = [book.next_pack(f"p{i}") for i in range(3)]
    assert [c["ids"] for c in packs] == [["m0", "m1"], ["m2", "m3"], ["m4", "m5"]]
    assert "homes" not in packs[0] and book.next_pack("none") is None  # nothing formed
    stop, stopped, _ = _report(book, "p0", 1, {"m0": 0.5, "m1": 0.1})
    assert stop and not stopped  # the pack ends at the rung; its members wait there
    assert {book.seats[m].fate for m in ("m0", "m1")} == {"waiting"}
    book.pack_ended("p0")
    _report(book, "p1", 1, {"m2": 0.2, "m3": 0.6})
    book.pack_ended("p1")
    assert not book.formed  # the rung waits for p2
    stop, stopped, _ = _report(book, "p2", 1, {"m4": 0.3, "m5": 0.7})
    assert stop and sorted(s.trial_id for s in stopped) == ["m0", "m3", "m5"]
    assert book.formed == [["m1", "m2"], ["m4"]]  # 3 of 6 go on: as few packs as 2 allows
    config = book.next_pack("p3")
    assert config == {"pack": [{"lr": 1}, {"lr": 2}], "ids": ["m1", "m2"],
                      "homes": ["p/m1", "p/m2"], "epoch": 1}
    assert fates(book) == {"done": 3, "running": 2, "paused": 1}


def test_a_regrouped_pack_reporting_its_start_again_trains_on():
    book = _book(2, 2, [1], max_t=3)
    book.next_pack("p0")
    _report(book, "p0", 1, {"m0": 0.2, "m1": 0.1})
    book.pack_ended("p0")
    assert book.next_pack("p1")["ids"] == ["m1"]
    stop, _, _ = _report(book, "p1", 1, {"m1": 0.1}, reported_again=True)
    assert not stop  # the epoch it was formed at: no arrival, no rung to wait at
    stop, _, _ = _report(book, "p1", 2, {"m1": 0.09})
    assert not stop
    stop, _, _ = _report(book, "p1", 3, {"m1": 0.08}, stop_reason="max_epochs")
    assert book.seats["m1"].fate == "ended" and book.finished()


def test_working_ahead_trains_past_an_undecided_rung_and_keeps_the_decision():
    book = _book(4, 2, [1, 4], max_t=6, work_ahead=True)
    book.next_pack("p0"), book.next_pack("p1")
    # p0 arrives while p1 still runs and nothing else waits: its members lead, it goes on
    stop, _, _ = _report(book, "p0", 1, {"m0": 0.1, "m1": 0.2}, idle=True)
    assert not stop
    stop, _, _ = _report(book, "p0", 2, {"m0": 0.09, "m1": 0.19}, idle=True)
    assert not stop
    stop, _, _ = _report(book, "p0", 3, {"m0": 0.08, "m1": 0.18}, idle=True)
    assert stop  # the epoch before the next rung: it waits there
    assert {book.seats[m].epoch for m in ("m0", "m1")} == {3}
    book.pack_ended("p0")
    # p1 arrives: m1 (0.2 at the rung, not its later 0.18) loses to m2
    stop, stopped, _ = _report(book, "p1", 1, {"m2": 0.15, "m3": 0.3})
    assert stop and sorted(s.trial_id for s in stopped) == ["m1", "m3"]
    # the survivors regroup by the epoch they reached
    assert sorted(book.formed) == [["m0"], ["m2"]]


def test_a_pack_training_ahead_stops_when_the_rung_stops_one_of_its_members():
    book = _book(4, 2, [1, 4], max_t=6, work_ahead=True)
    book.next_pack("p0"), book.next_pack("p1")
    assert not _report(book, "p0", 1, {"m0": 0.1, "m1": 0.2}, idle=True)[0]
    stop, stopped, others = _report(book, "p1", 1, {"m2": 0.05, "m3": 0.3})
    assert stop and others == ["p0"]  # p0 trains m1 ahead, and m1 is out
    assert sorted(s.trial_id for s in stopped) == ["m1", "m3"]
    assert book.seats["m0"].epoch == 1  # it goes on from the epoch it reported ...
    assert book.formed == [["m0", "m2"]]  # ... with the other survivor at that epoch


def test_a_failed_pack_fails_its_members_until_it_is_retried():
    book = _book(2, 2, [1], max_t=3)
    book.next_pack("p0")
    book.pack_ended("p0", errored=True)
    assert fates(book) == {"errored": 2}
    book.pack_back("p0")
    assert fates(book) == {"running": 2}


def test_the_members_of_a_pack_failed_for_good_go_on_in_a_new_one_up_to_max_failures():
    """Tune gives up on a trial whose worker's death it hears of twice: the members keep
    their state in their folders, so they go on in a new pack of the same composition."""
    book = _book(2, 2, [1, 3], max_t=4)
    book.max_failures = 1
    book.next_pack("p0")
    _report(book, "p0", 1, {"m0": 0.2, "m1": 0.1})
    book.pack_ended("p0")
    assert book.next_pack("p1")["ids"] == ["m1"]
    _report(book, "p1", 2, {"m1": 0.09}, idle=False)
    book.pack_ended("p1", errored=True)  # Tune retries it ...
    book.pack_back("p1")
    book.pack_ended("p1", errored=True)  # ... and hears of the same death again: gives up
    book.pack_failed("p1")
    assert book.next_pack("p2") == {"pack": [{"lr": 1}], "ids": ["m1"], "homes": ["p/m1"],
                                    "epoch": 2}
    book.pack_ended("p2", errored=True)
    book.pack_failed("p2")  # its one failure used up: it fails
    assert book.seats["m1"].fate == "failed" and book.finished()


def test_asha_regroups_when_the_survivors_fill_a_pack_or_no_one_else_can_come():
    book = _book(8, 2, [1, 2], max_t=4, kind="asha")
    for i in range(4):
        book.next_pack(f"p{i}")
    # ASHA: the first at a rung goes on, the next if it beats the median of those before
    _report(book, "p0", 1, {"m0": 0.2, "m1": 0.1})
    assert book.formed == [["m0", "m1"]]  # a full pack: no need to wait
    book.next_pack("p4")
    _report(book, "p1", 1, {"m2": 0.15, "m3": 0.9})
    assert not book.formed  # m2 waits: p2 and p3 may still bring survivors
    book.flush()  # unless a worker would sit idle
    assert book.formed == [["m2"]]

"""One driver per run directory (``cae.run.lease``): a second one refused with the holder named,
a dead one's lease taken over with a line, --force, the heartbeat, and a race."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cae.cli import main
from cae.config.spec import load_spec
from cae.run.directory import save_spec
from cae.run.lease import LEASE_FILE, STALE_S, Holder, Lease, LeaseHeld, read_holder


def _write_holder(run_dir, **changes):
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
              "heartbeat": now, "command": "cae sweep x.yaml", "token": "other", **changes}
    (run_dir / LEASE_FILE).write_text(json.dumps(holder))
    return Holder(**holder)


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    with Lease(str(tmp_path), "cae resume A"):
        with pytest.raises(LeaseHeld, match=rf"`cae resume A` \(pid {os.getpid()} on "):
            Lease(str(tmp_path), "cae resume B").acquire()
    assert not (tmp_path / LEASE_FILE).exists()  # given back at the end


def test_the_lease_of_a_driver_that_is_gone_is_taken_over_with_a_line(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _write_holder(tmp_path, pid=int(dead.stdout))
    said = []
    with Lease(str(tmp_path), "cae resume B", say=said.append):
        assert read_holder(str(tmp_path)).command == "cae resume B"
    assert len(said) == 1 and "taking over" in said[0] and "it is gone" in said[0]


def test_a_driver_killed_but_not_yet_reaped_is_gone(tmp_path):
    """A SIGKILLed driver whose parent has not waited for it (a zombie) still has its pid:
    it runs no more, so its lease is taken over."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        holder = _write_holder(tmp_path, pid=driver.pid)
        assert holder.alive() is True
        driver.kill()
        deadline = time.time() + 30
        while Path(f"/proc/{driver.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            assert time.time() < deadline, "the killed driver did not become a zombie"
            time.sleep(0.05)
        os.kill(driver.pid, 0)  # the pid is still there ...
        assert holder.alive() is False  # ... and the driver gone
        said = []
        with Lease(str(tmp_path), "cae resume B", say=said.append):
            assert read_holder(str(tmp_path)).command == "cae resume B"
        assert len(said) == 1 and "it is gone" in said[0]
    finally:
        driver.kill()
        driver.wait()


def test_another_hosts_driver_counts_as_gone_only_when_its_heartbeat_is_old(tmp_path):
    _write_holder(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(LeaseHeld, match="on elsewhere, heartbeat 0 s ago"):
        Lease(str(tmp_path), "cae resume B").acquire()
    _write_holder(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - STALE_S - 5)
    lease = Lease(str(tmp_path), "cae resume B", say=lambda text: None)
    lease.acquire()
    assert read_holder(str(tmp_path)).token == lease.me.token


def test_force_takes_it_from_a_live_driver_which_then_notices(tmp_path):
    lost = []
    first = Lease(str(tmp_path), "cae resume A", on_lost=lost.append)
    first.acquire()
    said = []
    Lease(str(tmp_path), "cae resume B", force=True, say=said.append).acquire()
    assert "--force" in said[0]
    assert first.beat() is False and lost[0].command == "cae resume B"


def test_the_heartbeat_moves_forward(tmp_path):
    lease = Lease(str(tmp_path), "cae resume A")
    lease.acquire()
    before = read_holder(str(tmp_path)).heartbeat
    time.sleep(0.05)
    assert lease.beat() and read_holder(str(tmp_path)).heartbeat > before


def _race(run_dir: str, go, results, done) -> None:
    go.wait()
    try:
        Lease(run_dir, f"cae resume {os.getpid()}", say=lambda text: None).acquire()
        results.put("took")
        done.wait(30)  # a driver that took it stays alive while the others try
    except LeaseHeld:
        results.put("refused")


def test_drivers_starting_at_once_cannot_both_hold_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    go, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), go, results, done))
             for _ in range(4)]
    for p in procs:
        p.start()
    go.set()
    outcomes = sorted(results.get(timeout=30) for _ in procs)
    done.set()
    for p in procs:
        p.join(30)
    assert outcomes.count("took") == 1, outcomes


def test_cae_resume_is_refused_while_another_driver_holds_the_run(tmp_path, capsys):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    save_spec(str(tmp_path), load_spec(str(repo / "sweeps" / "quickstart.yaml")))
    _write_holder(tmp_path)  # this test's own process: alive
    assert main(["resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cae: error: ") and "in use by another driver" in err
    assert "cae sweep x.yaml" in err and "--force" in err

    assert main(["status", str(tmp_path)]) == 0
    assert "driver: `cae sweep x.yaml`" in capsys.readouterr().out

"""What ``cae sweep`` and ``cae resume`` do between their arguments and their last line.

A sweep: the spec checked (``cae.sweep.plan``), the storage checked for room, the datasets
loaded once, the run directory's lease taken (``cae.run.lease``), Ray started (or attached
to), the Tuner run with the console (``cae.sweep.progress``) and the run's guard
(``cae.sweep.guard``), the spec's trackers fed as results arrive (``cae.track``), and the
run finished (``cae.results.finish``: tables, reference errors, report; then the trackers
get the tables). A resume does the same on an existing run directory, after repairing a
state file cut short (``cae.run.state``).

Exit status: 0 when every trial has finished, ``EXIT_INTERRUPTED`` (3) when the sweep was
stopped (Ctrl-C, SIGUSR1 or SIGTERM, a job's time limit) with trials left to run, for
``cae resume``; a full storage or a lost lease is a ``UserError`` (2) saying what to do.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cae.config.errors import UserError, debug
from cae.config.spec import SweepSpec
from cae.run import directory as rundir
from cae.run import state as runstate
from cae.run.diskspace import StorageFull, check_room, free_bytes, mib
from cae.run.lease import Holder, Lease
from cae.run.outcomes import all_finished
from cae.sweep import plan
from cae.track.send import check_packages

EXIT_DONE, EXIT_INTERRUPTED = 0, 3


@dataclass
class Console:
    """What a sweep shows and writes while it runs (``cae sweep``'s options)."""

    report_every: float = 300.0
    no_report: bool = False
    verbose: bool = False
    dashboard: bool = False


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _command() -> str:
    return "cae " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "cae"


def new_sweep(spec: SweepSpec, name: str, *, address: str | None = None,
              data_dir: str | None = None, force: bool = False,
              console: Console | None = None) -> int:
    """Run ``spec`` into a new run directory ``spec.storage/name``."""
    check_packages(spec.tracking)  # a tracker named without its package: before anything
    budget = plan.budget_for(spec, address)
    plan.record_data_dir(spec, data_dir)  # first: the check validates what the trials run
    checked = plan.check_spec(spec, budget)
    if not plan.attached(address):
        plan.check_local_resources(spec)
    run_dir = f"{rundir.storage_uri(spec.storage).rstrip('/')}/{name}"
    if not rundir.is_uri(run_dir):
        if (Path(run_dir) / rundir.SPEC_FILE).is_file():
            raise UserError(f"{run_dir} already holds a sweep: continue it with `cae resume "
                            f"{run_dir}`, or give another --name")
        check_room(run_dir, checked.disk)
    datasets = plan.load_datasets(checked)
    # a user's images: what was read, exactly; checked again only where that differs from
    # what the check read in their headers
    if plan.record_data_facts(spec, checked):
        checked = plan.check_spec(spec, budget)

    def start(callbacks: list) -> None:
        from cae.sweep import tuner

        tuner.check_cluster(spec)
        rundir.save_spec(run_dir, spec)
        print(f"sweep {spec.name}: {checked.n_trials} trials -> {run_dir}", flush=True)
        tuner.fit(spec, datasets, run_dir, checked, callbacks, verbose=console.verbose)

    console = console or Console()
    return _drive(run_dir, spec, checked, start, address, force, console, datasets=datasets)


def resume_sweep(run_dir: str, *, address: str | None = None, data_dir: str | None = None,
                 force: bool = False, console: Console | None = None) -> int:
    """Continue the interrupted sweep of ``run_dir`` (see ``cae.sweep.tuner.resume``)."""
    run_dir = rundir.storage_uri(run_dir)
    spec = rundir.load_run_spec(run_dir)
    check_packages(spec.tracking)
    if data_dir:
        plan.record_data_dir(spec, data_dir)  # for this resume, not saved
    checked = plan.check_spec(spec)
    console = console or Console()
    if _finished(run_dir):  # every trial has ended: nothing to start, no data to load
        print(f"resuming {run_dir}: every trial of the run has finished; nothing to resume",
              flush=True)
        return _end(run_dir, spec, checked.n_trials, console, data_dir, None,
                    _tracking(spec, run_dir, _stderr))
    datasets = plan.load_datasets(checked)
    _say_old_dropout(run_dir)

    def start(callbacks: list) -> None:
        from cae.sweep import tuner

        tuner.check_cluster(spec, run_dir)
        print(f"resuming {run_dir}", flush=True)
        adopt, fresh = _repair(run_dir)
        if fresh:  # no state to restore: start again, every trial taking over its directory
            tuner.fit(spec, datasets, run_dir, checked, callbacks, verbose=console.verbose,
                      adopt=adopt)
        else:
            tuner.resume(run_dir, spec, datasets, callbacks, verbose=console.verbose,
                         adopt=adopt)

    return _drive(run_dir, spec, checked, start, address, force, console,
                  data_dir=data_dir, datasets=datasets)


def _say_old_dropout(run_dir: str) -> None:
    """One line when trials with dropout go on from checkpoints of a cae that drew their
    masks otherwise (``cae.run.checkpoints.old_dropout_trials``): they continue, and their
    later epochs are not those the earlier cae would have trained."""
    from cae.run.checkpoints import old_dropout_trials

    old = old_dropout_trials(run_dir)
    if old:
        _stderr(f"cae: note: {len(old)} trial(s) with dropout go on from checkpoints of a cae "
                "from before 2026-12-06, which drew dropout masks from torch's global "
                "generator; from here they draw them from each trial's seed, so their "
                "later epochs differ from an uninterrupted run of that cae's")


def _finished(run_dir: str) -> bool:
    """Whether every trial of the run has ended (``cae status`` says finished)."""
    from cae.results.status import run_status

    return run_status(run_dir).state == "finished"


def _repair(run_dir: str) -> tuple[dict[str, str], bool]:
    """Before a resume of a local run: a state file cut short is set aside for cae's last
    good copy (``cae.run.state.repair``). Returns the trials the restored state does not
    know (to be taken over by the resumed trials with the same point) and whether there is
    no state at all to restore."""
    if rundir.is_uri(run_dir):
        return {}, False
    local = rundir.local_path(run_dir)
    said = runstate.repair(local)
    if said:
        _stderr(f"cae: {said}")
    statuses = runstate.read_statuses(local)
    adopt = runstate.orphans(local, set(statuses.trials))
    if said and adopt:
        _stderr(f"cae: {len(adopt)} trials the restored state does not know go on from their "
                "own checkpoints")
    return adopt, statuses.source is None


def _drive(run_dir: str, spec: SweepSpec, checked: plan.Checked,
           start: Callable[[list], None], address: str | None, force: bool,
           console: Console, data_dir: str | None = None, datasets: dict | None = None) -> int:
    """Hold the lease, run ``start(callbacks)`` in a Ray session, then finish the run."""
    from cae.sweep import internals, tuner

    internals.check()  # before Ray starts: an unadmitted Ray stops here, with the reason

    stop: list[Callable[[str], None]] = []
    lease = Lease(run_dir, _command(), force=force, say=_stderr,
                  on_lost=lambda holder: [f(_lost(holder)) for f in stop])
    with lease, tuner.ray_session(address, dashboard=console.dashboard):
        from cae.sweep import progress
        from cae.sweep.guard import RunGuard

        # below room for an average trial's checkpoints, the storage counts as full
        guard = RunGuard(run_dir, checked.disk.checkpoints // max(checked.n_trials, 1))
        stop.append(guard.stop)
        bar = progress.for_run(spec, checked, run_dir, console.report_every,
                               final_report=console.no_report, verbose=console.verbose)
        guard.say = bar.say
        tracking = _tracking(spec, run_dir, bar.say)
        try:
            start([bar, guard, *_tracking_callbacks(tracking)])
        except Exception as exc:
            if guard.storage_full(str(exc)):
                raise _full(run_dir) from exc
            raise
    if guard.stopped == "storage full":
        raise _full(run_dir)
    if guard.stopped:
        raise UserError(f"{guard.stopped}; this driver stopped its sweep")
    return _end(run_dir, spec, checked.n_trials, console, data_dir, datasets, tracking)


def _tracking(spec: SweepSpec, run_dir: str, say: Callable[[str], None]):
    """The trackers of the spec's ``tracking:`` block, fed in the background (or None)."""
    if not spec.tracking.named():
        return None
    from cae.track.send import SweepTracking

    return SweepTracking(spec, run_dir, say=say)


def _tracking_callbacks(tracking) -> list:
    if tracking is None:
        return []
    from cae.track.callback import TrackingCallback

    return [TrackingCallback(tracking)]


def _lost(holder: Holder | None) -> str:
    who = holder.describe() if holder is not None else "no driver (the lease file is gone)"
    return f"the run directory's lease is now held by {who}"


def _full(run_dir: str) -> StorageFull:
    free = "" if rundir.is_uri(run_dir) else f" ({mib(free_bytes(rundir.local_path(run_dir)))}" \
                                             " free)"
    return StorageFull(f"the storage of {run_dir} is full{free}: the sweep stopped, every "
                       f"trial keeps its last checkpoint; free some space, then `cae resume "
                       f"{run_dir}`")


def _end(run_dir: str, spec: SweepSpec, n_trials: int, console: Console,
         data_dir: str | None, datasets: dict | None, tracking=None) -> int:
    """Finish the run (the report's failure costs one line), send its tables to the
    trackers, and choose the exit status."""
    from cae.results.finish import finish, summary

    try:
        done = finish(run_dir, report=not console.no_report, data_dir=data_dir,
                      datasets=datasets)
    except Exception as exc:
        if debug():
            raise
        _stderr(f"cae: the report could not be written ({type(exc).__name__}: {exc}); the "
                f"results are complete: try `cae report {run_dir}`")
        done = finish(run_dir, report=False, references=False, say=lambda t: None)
    complete = all_finished(done.frames.trials, n_trials)
    print(summary(done.frames.trials, run_dir, spec.swept(), n_trials))
    if done.report_at:
        print(f"report: {done.report_at}")
    if tracking is not None:
        tracking.finish(done.frames.trials, done.frames.epochs, done.report, complete)
    print(f"run directory: {run_dir}")
    return EXIT_DONE if complete else EXIT_INTERRUPTED

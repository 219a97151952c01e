"""A checked sweep spec becomes a Ray Tune run: search space, scheduler, resources,
storage, the console; resume.

What is checked before Ray starts is ``cae.sweep.plan``; what drives a sweep from start to end
(the lease, the callbacks, the storage, the end of the run) is ``cae.sweep.driver``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager

from cae.config.spec import SweepSpec
from cae.run.diskspace import CHECKPOINTS_KEPT
from cae.sweep import internals
from cae.sweep.plan import Checked, attached
from cae.sweep.signals import sigterm_stops_tune

METRIC, MODE = "val_loss", "min"


# ---- Ray Tune ---------------------------------------------------------------------------


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {
        "grid": tune.grid_search, "choice": tune.choice,
        "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a), "fixed": lambda v: v,
    }
    return {key: make[kind](arg) for key, (kind, arg) in spec.axes().items()}


def scheduler(spec: SweepSpec, max_epochs: int):
    """ASHA or SHA per stratum (``cae.schedule.schedulers``), or FIFO."""
    from cae.schedule import create_scheduler

    s = spec.scheduler
    return create_scheduler(s.kind, s.stratify, max_t=s.max_t or max_epochs,
                            grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                            metric=METRIC, mode=MODE, work_ahead=s.work_ahead)


def wrapped_trainable(spec: SweepSpec, datasets: dict, run_dir: str,
                      adopt: dict[str, str] | None = None):
    """``cae.sweep.trainable.run_trial`` (``run_pack``, its name for a fused sweep's packs)
    with the sweep's data and run directory, its resources per Tune trial, and the trials of
    an earlier run to take over (``adopt``: search-space point -> directory)."""
    from ray import tune

    from cae.sweep.trainable import run_pack, run_trial

    fn = tune.with_parameters(run_pack if spec.fusion() else run_trial, base=spec.trial,
                              datasets=datasets, run_dir=run_dir, adopt=adopt or {},
                              threads=max(1, int(spec.resources.cpu)))
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def run_config(spec: SweepSpec, name: str, storage: str, callbacks: Sequence = (),
               verbose: bool = False):
    """Ray Tune's per-trial boxes and status tables only when ``verbose``; otherwise the
    ``callbacks`` (``cae.sweep.progress.ProgressCallback``) are what the console shows."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        callbacks=list(callbacks),
        verbose=1 if verbose else 0,
    )


@contextmanager
def console(verbose: bool):
    """Ray Tune's console output for one ``fit``. Quiet (not ``verbose``): at ``verbose=0``
    Tune's new output engine prints a configuration box and result paths all the same,
    Tune logs each trial failure with its traceback, Ray prints the traceback of failed
    tasks nobody fetched, and Tune logs an interruption with Tuner.restore as the way back;
    cae's callbacks say each of these in a line (``cae.sweep.internals`` names what is
    turned off)."""
    if verbose:
        yield
        return
    quiet = {internals.NEW_OUTPUT_ENV: "0", internals.PRINT_TRIAL_ERRORS_ENV: "0",
             internals.UNHANDLED_ERRORS_ENV: "1"}
    with environ(quiet), internals.quiet_tune_logs():
        yield


@contextmanager
def environ(values: dict[str, str]):
    """Environment variables set for the length of a block, restored afterwards."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pending_trials(spec: SweepSpec) -> dict[str, str]:
    """How many trials Tune may keep waiting for resources. For any searcher but its own
    grid generator Ray allows one, so a cluster (or two cores) fills one trial at a
    time; the shuffled grid knows all its trials up front, so it gets what Ray gives a
    grid (at least 200, or 1.1 per CPU of the cluster: the autoscaler sees the demand);
    TPE learns from finished trials, so it gets one per CPU. A value the user set wins."""
    if internals.MAX_PENDING_ENV in os.environ:
        return {}
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    n = max(200, int(cpus * 1.1)) if spec.search.kind == "grid" else max(2, int(cpus))
    return {internals.MAX_PENDING_ENV: str(n)}


def init_ray(address: str | None, dashboard: bool = False) -> bool:
    """Attach to a cluster (``--address``, or the one a Ray job runs in), or start Ray
    in-process on 127.0.0.1, with the dashboard (http://127.0.0.1:8265) only if asked.
    Returns whether this call initialised Ray (False if it already was)."""
    attach = attached(address)
    if not attach:
        # Ray's single-machine mode: every server binds to the loopback address only (read
        # when ray is first imported; tests/conftest.py sets it for in-process runs).
        os.environ.setdefault(internals.LOOPBACK_ENV, "0")
        # Tune snapshots the experiment state every couple of checkpoints of a trial
        # (CheckpointConfig.num_to_keep) and warns when that happens within seconds; on a
        # local disk a snapshot is a file copy, cheap beside an epoch (benchmarks/overhead.py
        # measures it), so the warning is only noise here.
        os.environ.setdefault(internals.SYNC_WARNING_ENV, "0")
        token_auth_without_notice()
    import ray

    if ray.is_initialized():
        return False
    if attach:
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    return True


# Ray's switch for token authentication (``disabled`` or ``token``), read when ray is first
# imported; documented in Ray's security guide.
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def token_auth_without_notice() -> None:
    """A Ray started here uses token authentication, as Ray's default has it, without the
    notice Ray prints at each start while the mode is left unset ("Token authentication is
    enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out"): cae's local Ray
    listens on 127.0.0.1 alone, and the notice asks nothing of the user. Only before ray
    is first imported (a process that imported it already keeps Ray's own default, since
    Ray reads the mode on import); a mode the user set wins."""
    if "ray" not in sys.modules:
        os.environ.setdefault(AUTH_MODE_ENV, "token")


@contextmanager
def ray_session(address: str | None, dashboard: bool = False):
    """Ray for the length of one sweep: shut down afterwards if this call started it."""
    started = init_ray(address, dashboard)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def searcher_and_scheduler(spec: SweepSpec, run_dir: str, checked: Checked):
    """The searcher, the number of Tune trials it hands out (-1: as many as it forms) and
    the scheduler of a sweep. A fused sweep has one Tune trial per pack
    (``cae.sweep.packplan``): a fixed list of packs under FIFO, or, under successive
    halving, the packs its survivors are regrouped into at each rung."""
    from cae.schedule import create_searcher

    if spec.fusion() and spec.scheduler.kind != "fifo":
        from cae.sweep.packplan import fused_halving

        searcher, sched = fused_halving(spec, param_space(spec), run_dir, checked.max_epochs,
                                        checked.budget, METRIC, MODE)
        return searcher, -1, sched
    if spec.fusion():
        from cae.sweep.packplan import pack_searcher

        searcher, n_trials = pack_searcher(spec, param_space(spec), checked.budget)
    else:
        searcher, n_trials = create_searcher(spec, param_space(spec))
    return searcher, n_trials, scheduler(spec, checked.max_epochs)


def fit(spec: SweepSpec, datasets: dict, run_dir: str, checked: Checked,
        callbacks: Sequence = (), verbose: bool = False, adopt: dict[str, str] | None = None):
    """Run the sweep into ``run_dir`` (storage/name) to the end, or until SIGINT, SIGUSR1 or
    SIGTERM stops it (state saved, resumable); returns Ray Tune's ResultGrid. ``adopt``: see
    ``wrapped_trainable``."""
    from ray import tune

    from cae.schedule.schedulers import speculation_marks

    storage, name = run_dir.rstrip("/").rsplit("/", 1)
    searcher, n_trials, sched = searcher_and_scheduler(spec, run_dir, checked)
    trainable = wrapped_trainable(spec, datasets, run_dir, adopt)
    # the scheduler's marks on results (trained ahead of a rung; the members of packs under
    # halving), saved with the tuner, so a resume keeps the pair; before the console reads them
    callbacks = [speculation_marks(sched), *callbacks]
    tuner = tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, scheduler=sched,
            search_alg=searcher, num_samples=n_trials,
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=True,  # skip a process start and the torch import per trial
        ),
        run_config=run_config(spec, name, storage, callbacks, verbose),
    )
    with console(verbose), environ(pending_trials(spec)), sigterm_stops_tune():
        return tuner.fit()


def resume(run_dir: str, spec: SweepSpec, datasets: dict, callbacks: Sequence = (),
           verbose: bool = False, adopt: dict[str, str] | None = None):
    """Continue an interrupted sweep: unfinished trials go on from their checkpoints;
    finished ones are not run again; errored ones stay errors. The searcher goes on from
    the state Tune saved with the experiment. ``adopt``: see ``wrapped_trainable``."""
    from ray import tune

    from cae.schedule.schedulers import SpeculationMarks
    from cae.sweep.moved import old_names

    with old_names():  # a run made before cae's modules moved: its pickles name old paths
        tuner = tune.Tuner.restore(run_dir, trainable=wrapped_trainable(spec, datasets,
                                                                        run_dir, adopt),
                                   resume_unfinished=True, resume_errored=False)
        # The run config comes back from the run's tuner.pkl as the sweep began; this
        # resume's console settings replace it (Tuner.restore takes no run config of its own).
        restored = internals.restored_run_config(tuner)
        marks = [c for c in restored.callbacks or [] if isinstance(c, SpeculationMarks)]
        restored.callbacks, restored.verbose = marks + list(callbacks), 1 if verbose else 0
        with console(verbose), environ(pending_trials(spec)), sigterm_stops_tune():
            return tuner.fit()


def check_cluster(spec: SweepSpec, storage: str | None = None) -> None:
    """On an attached cluster: refuse a local storage path that some node cannot see, before
    any trial starts (``cae.sweep.cluster.check_shared_storage`` raises a ValueError naming
    them)."""
    from cae.sweep.cluster import check_shared_storage

    check_shared_storage(storage or spec.storage,
                         {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu})

"""A SweepSpec becomes a Ray Tune run: search space, scheduler, resources, storage; resume.

Before Ray starts, every grid point is validated (``check_spec``): an impossible
architecture anywhere in the grid is an error naming the field and the point, and nothing
is started or written. ``summarize`` is the dry run's content.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cae import ray_internals
from cae.catalog import DATASETS
from cae.config import (
    DataConfig,
    SweepSpec,
    TrialConfig,
    UserError,
    apply_point,
    format_validation_error,
    stratum_of,
)
from cae.memory import estimate, trial_budget

METRIC, MODE = "val_loss", "min"
# More grid points than this is a typo or a spec for another tool; checking is linear.
MAX_GRID_POINTS = 1_000_000


class SpecError(UserError):
    """A sweep spec that cannot run; the message names the field (and the grid point)."""


# ---- the grid, validated without Ray ----------------------------------------------------


def _validation_values(kind: str, arg: Any) -> list:
    """Values that stand for an axis when checking shapes: all of a grid or choice, the
    ends of a range."""
    if kind in ("grid", "choice"):
        return list(arg)
    if kind == "fixed":
        return [arg]
    if kind == "randint":
        return [arg[0], arg[1] - 1]
    return [arg[0], arg[1]]


def _label(point: dict) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in point.items()) + "}"


@dataclass
class Checked:
    """A validated spec: trial count, and each distinct architecture with a grid point."""

    spec: SweepSpec
    n_points: int  # grid points (product of grid axes)
    n_trials: int  # grid points x num_samples
    models: dict[str, tuple[TrialConfig, dict]] = field(default_factory=dict)
    datasets: dict[str, DataConfig] = field(default_factory=dict)  # source key -> config
    max_epochs: int = 0
    train_images: int = 0
    memory: dict[str, int] = field(default_factory=dict)  # architecture -> bytes per trial
    budget: tuple[int, str] | None = None  # bytes one trial may use, and of what
    strata: dict[str, int] = field(default_factory=dict)  # stratum label -> trials


def check_spec(spec: SweepSpec, budget: tuple[int, str] | None = None,
               to_run: bool = True) -> Checked:
    """Validate the base trial and every grid point (with the ends of random ranges).

    ``budget`` (bytes, and of what: see ``cae.memory.trial_budget``) refuses a grid point
    whose trial would not fit its share of the device. ``to_run=False`` reads a run's spec
    without running it here (``cae status``): its searcher's package need not be
    installed."""
    axes = spec.axes()
    keys = list(axes)
    for key, (kind, _arg) in axes.items():
        if key.startswith("data.") and kind not in ("fixed", "grid", "choice"):
            raise SpecError(f"space.{key}: a data setting can be fixed, a grid or a choice, "
                            f"not {kind} (each distinct dataset is loaded before the sweep)")
    values = [_validation_values(*axes[k]) for k in keys]
    n_points = 1
    for k in keys:
        if axes[k][0] == "grid":
            n_points *= len(axes[k][1])
    n_checks = 1
    for v in values:
        n_checks *= len(v)
    if max(n_points, n_checks) > MAX_GRID_POINTS:
        raise SpecError(f"space: {max(n_points, n_checks):,} combinations of the axes to run or "
                        f"check; the limit is {MAX_GRID_POINTS:,}: split the sweep")
    checked = Checked(spec, n_points, n_points * spec.num_samples, budget=budget)
    seen: dict[str, TrialConfig] = {}
    for combo in itertools.product(*values):
        point = dict(zip(keys, combo))
        try:
            data = apply_point(json.loads(json.dumps(spec.trial)), point)
        except UserError as exc:
            raise SpecError(f"space.{exc}") from None
        cache_key = json.dumps(data, sort_keys=True)
        if cache_key in seen:
            continue
        where = f"at grid point {_label(point)}" if point else "in the base trial"
        try:
            cfg = TrialConfig.model_validate(data)
        except ValidationError as exc:
            msg = format_validation_error(exc).removeprefix("invalid config: ")
            raise SpecError(f"{msg} ({where})") from None
        seen[cache_key] = cfg
        checked.datasets.setdefault(cfg.data.source_key(), cfg.data)
        arch = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
        checked.models.setdefault(arch, (cfg, point))
        need = estimate(cfg)
        checked.memory[arch] = max(checked.memory.get(arch, 0), need.total)
        if budget is not None and need.total > budget[0]:
            raise SpecError(
                f"{where}: a trial needs about {need.total / 2**20:,.0f} MiB ({need}) but may "
                f"use {budget[0] / 2**20:,.0f} MiB ({budget[1]}); lower batch_size, the "
                "model's size or data.train_limit, or give each trial more resources")
        checked.max_epochs = max(checked.max_epochs, cfg.max_epochs)
        size = DATASETS[cfg.data.dataset].train_size
        if cfg.data.train_limit:
            size = min(size, cfg.data.train_limit)
        checked.train_images = max(checked.train_images, int(size * (1 - cfg.data.val_fraction)))
    sched = spec.scheduler
    if sched.kind != "fifo" and sched.max_t is not None and sched.max_t < checked.max_epochs:
        raise SpecError(
            f"scheduler.max_t ({sched.max_t}) is below trial max_epochs ({checked.max_epochs}); "
            "the scheduler would cut every trial before its test evaluation: raise max_t or "
            "lower max_epochs"
        )
    if to_run:
        check_search(spec)
    if sched.kind == "sha" and spec.max_concurrent is not None:
        raise SpecError("max_concurrent: not with scheduler.kind 'sha' (Ray counts the trials "
                        "paused at a rung as running, so the sweep could wait forever); limit "
                        "concurrency through resources.cpu / resources.gpu instead")
    checked.strata = strata(spec)
    return checked


def check_search(spec: SweepSpec) -> None:
    """``search: {kind: optuna}`` needs Optuna (an extra): refuse before Ray starts."""
    if spec.search.kind != "optuna":
        return
    from importlib import metadata

    try:
        version = metadata.version("optuna")
    except metadata.PackageNotFoundError:
        version = None
    parts = [int(x) if x.isdigit() else 0 for x in (version or "0.0").split(".")[:2]]
    if version is None or parts < [3, 4]:
        found = "it is not installed" if version is None else f"found {version}"
        raise SpecError(f"search.kind: 'optuna' needs the optuna package >= 3.4 ({found}); "
                        "install it with pip install 'cae-sweep[optuna]'")


def strata(spec: SweepSpec) -> dict[str, int]:
    """Each stratum of ``scheduler.stratify`` (its values, as a label) -> its trials."""
    keys = spec.scheduler.stratify
    if not keys or spec.scheduler.kind == "fifo":
        return {}
    axes = {k: v for k, v in spec.axes().items() if v[0] == "grid"}
    names = list(axes)
    out: dict[str, int] = {}
    for combo in itertools.product(*(axes[k][1] for k in names)):
        values = stratum_of(dict(zip(names, combo)), keys)  # as the scheduler groups them
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
        out[label] = out.get(label, 0) + spec.num_samples
    return out


def summarize(checked: Checked) -> str:
    """The dry run: trials, distinct architectures with params and latent size, the work."""
    from cae.arch import describe

    spec = checked.spec
    swept = [k for k, (kind, _) in spec.axes().items() if kind != "fixed"]
    sched = spec.scheduler
    how = sched.kind if not sched.stratify or sched.kind == "fifo" else (
        f"{sched.kind} per stratum of {', '.join(sched.stratify)}")
    if spec.search.kind == "optuna":
        first = min(spec.search.startup(spec.num_samples), spec.num_samples)
        order = (f"random axes proposed by Optuna's TPE, one search per grid point (its first "
                 f"{first} trials at random), seed {spec.seed}")
    else:
        order = f"trials started in an order shuffled with seed {spec.seed}"
    lines = [
        f"sweep {spec.name}: {checked.n_trials} trials ({checked.n_points} grid points x "
        f"{spec.num_samples} samples), scheduler {how}, {order}",
        f"distinct architectures: {len(checked.models)}",
        f"  {'params':>10} {'latent':>7} {'memory':>9}  grid point",
    ]
    rows = []
    for arch, (cfg, point) in checked.models.items():
        info = describe(cfg.model)
        label = ", ".join(f"{k}={json.dumps(v)}" for k, v in point.items()
                          if k.startswith(("model.", "variant")))
        rows.append((info["params"], info["latent_size"], checked.memory[arch],
                     label or cfg.model.preset or "base"))
    for params, latent, mem, label in sorted(rows, key=lambda r: (r[1], r[0])):
        lines.append(f"  {params:>10,} {latent:>7} {mem / 2**20:>5,.0f} MiB  {label}")
    if len(checked.datasets) > 1:
        names = sorted({json.loads(k)[0] for k in checked.datasets})
        lines.append(f"datasets: {len(checked.datasets)} loaded once each ({', '.join(names)})")
    if checked.budget is not None:
        lines.append(f"memory per trial: at most {max(checked.memory.values()) / 2**20:,.0f} MiB "
                     f"of the {checked.budget[0] / 2**20:,.0f} MiB a trial may use here "
                     f"({checked.budget[1]})")
    if checked.strata:
        sizes = sorted(set(checked.strata.values()))
        each = f"{sizes[0]} trials each" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} trials"
        lines.append(f"strata: {len(checked.strata)} ({each}); the best of each is trained "
                     "to the end:")
        lines += [f"  {label}: {n} trials" for label, n in checked.strata.items()]
    trial_epochs = checked.n_trials * checked.max_epochs
    lines.append(
        f"work: at most {trial_epochs:,} trial-epochs ({checked.n_trials} x "
        f"{checked.max_epochs}), {trial_epochs * checked.train_images:,} training images"
        + ("; weak trials stopped early" if spec.scheduler.kind != "fifo" else "")
    )
    lines.append(f"swept axes: {', '.join(swept) or 'none'}")
    lines.append(f"resources per trial: {spec.resources.cpu:g} cpu, {spec.resources.gpu:g} gpu")
    return "\n".join(lines)


def local_budget(spec: SweepSpec) -> tuple[int, str] | None:
    """What one trial of ``spec`` may use on this machine (see ``cae.memory.trial_budget``)."""
    return trial_budget(spec.resources.cpu, spec.resources.gpu)


def check_local_resources(spec: SweepSpec) -> None:
    """Refuse GPUs per trial that this machine does not have (local runs only)."""
    if spec.resources.gpu > 0:
        import torch

        have = torch.cuda.device_count()
        if spec.resources.gpu > max(have, 0) or have == 0:
            raise SpecError(
                f"resources.gpu: {spec.resources.gpu:g} GPU per trial asked for, but this machine "
                f"has {have}; set resources.gpu: 0 or run on a cluster with GPUs (--address)"
            )
    if spec.resources.cpu > (os.cpu_count() or 1):
        raise SpecError(
            f"resources.cpu: {spec.resources.cpu:g} CPUs per trial asked for, but this machine "
            f"has {os.cpu_count()}"
        )


# ---- data ------------------------------------------------------------------------------


def record_data_dir(spec: SweepSpec, checked: Checked | None, data_dir: str | None) -> bool:
    """Write where the sweep's datasets live into ``spec.trial`` (so the run directory's
    spec says it, and ``cae report`` and ``cae resume`` read the same files): ``data_dir``,
    else the default root (``$CAE_DATA_DIR`` or the cache). Nothing is recorded for a sweep
    on the embedded sample alone. Returns whether the spec changed."""
    from cae.data import data_root

    names = {json.loads(k)[0] for k in checked.datasets} if checked else {"?"}
    if not data_dir and names <= {"sample"}:
        return False
    data = spec.trial.setdefault("data", {})
    if not isinstance(data, dict):
        raise SpecError("trial.data must be a mapping")
    if data.get("data_dir") and not data_dir:
        return False
    data["data_dir"] = str(data_root(data_dir).resolve())
    return True


def load_datasets(checked: Checked) -> dict:
    """Every distinct dataset of the sweep, loaded once on the driver (source key ->
    ``ImageData``); trials receive them through Ray's object store."""
    from cae.data import load

    return {key: load(cfg) for key, cfg in checked.datasets.items()}


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
    """ASHA or SHA per stratum (``cae.schedulers``), or FIFO."""
    from cae.schedulers import make_scheduler

    s = spec.scheduler
    return make_scheduler(s.kind, s.stratify, max_t=s.max_t or max_epochs,
                          grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                          metric=METRIC, mode=MODE)


def wrapped_trainable(spec: SweepSpec, datasets: dict):
    from ray import tune

    from cae.trainable import run_trial

    fn = tune.with_parameters(run_trial, base=spec.trial, datasets=datasets,
                              threads=max(1, int(spec.resources.cpu)))
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def run_config(spec: SweepSpec, name: str, storage: str, callbacks: Sequence = (),
               verbose: bool = False):
    """Ray Tune's per-trial boxes and status tables only when ``verbose``; otherwise the
    ``callbacks`` (``cae.progress.ProgressCallback``) are what the console shows."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks),
        verbose=1 if verbose else 0,
    )


@contextmanager
def console(verbose: bool):
    """Ray Tune's console output for one ``fit``. Quiet (not ``verbose``), Ray 2.60 still
    prints a configuration box and result paths at ``verbose=0`` with its new output engine
    (``RAY_AIR_NEW_OUTPUT``; its older one prints nothing at 0), and logs each trial failure
    with its traceback (``TUNE_PRINT_ALL_TRIAL_ERRORS``); both are read when the run starts,
    and a callback prints one line per error instead."""
    quiet = {ray_internals.NEW_OUTPUT_ENV: "0", ray_internals.PRINT_TRIAL_ERRORS_ENV: "0"}
    with environ({} if verbose else quiet):
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
    grid generator Ray 2.60 allows one, so a cluster (or two cores) fills one trial at a
    time; the shuffled grid knows all its trials up front, so it gets what Ray gives a
    grid (at least 200, or 1.1 per CPU of the cluster: the autoscaler sees the demand);
    TPE learns from finished trials, so it gets one per CPU. A value the user set wins."""
    if ray_internals.MAX_PENDING_ENV in os.environ:
        return {}
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    n = max(200, int(cpus * 1.1)) if spec.search.kind == "grid" else max(2, int(cpus))
    return {ray_internals.MAX_PENDING_ENV: str(n)}


def init_ray(address: str | None, dashboard: bool = False) -> bool:
    """Attach to a cluster (``--address``, or the one a Ray job runs in), or start Ray
    in-process on 127.0.0.1, with the dashboard (http://127.0.0.1:8265) only if asked.
    Returns whether this call initialised Ray (False if it already was)."""
    attach = address or os.environ.get("RAY_ADDRESS")
    if not attach:
        # Ray's single-machine mode: every server binds to the loopback address only (read
        # when ray is first imported; tests/conftest.py sets it for in-process runs).
        os.environ.setdefault(ray_internals.LOOPBACK_ENV, "0")
        # Tune snapshots the experiment state every couple of checkpoints of a trial
        # (CheckpointConfig.num_to_keep) and warns when that happens within seconds; on a
        # local disk a snapshot is a file copy (benchmarks/overhead.py: 6.5 ms per epoch
        # for report and checkpoint together), so the warning is only noise here.
        os.environ.setdefault(ray_internals.SYNC_WARNING_ENV, "0")
    import ray

    if ray.is_initialized():
        return False
    if attach:
        ray.init(address=attach, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    return True


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


def fit(spec: SweepSpec, datasets: dict, name: str, storage: str, checked: Checked,
        callbacks: Sequence = (), verbose: bool = False):
    """Run the sweep to the end; returns Ray Tune's ResultGrid."""
    from ray import tune

    from cae.search import make_searcher

    searcher, n_trials = make_searcher(spec, param_space(spec))
    tuner = tune.Tuner(
        wrapped_trainable(spec, datasets),
        param_space={},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, scheduler=scheduler(spec, checked.max_epochs),
            search_alg=searcher, num_samples=n_trials,
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=True,  # skip a process start and the torch import per trial
        ),
        run_config=run_config(spec, name, storage, callbacks, verbose),
    )
    with console(verbose), environ(pending_trials(spec)):
        return tuner.fit()


def resume(run_dir: str, spec: SweepSpec, datasets: dict, callbacks: Sequence = (),
           verbose: bool = False):
    """Continue an interrupted sweep: unfinished trials go on from their checkpoints;
    finished ones are not run again; errored ones stay errors. The searcher goes on from
    the state Tune saved with the experiment."""
    from ray import tune

    tuner = tune.Tuner.restore(run_dir, trainable=wrapped_trainable(spec, datasets),
                               resume_unfinished=True, resume_errored=False)
    # The run config comes back from the run's tuner.pkl as the sweep began; this resume's
    # console settings replace it (Tuner.restore takes no run config of its own).
    restored = ray_internals.restored_run_config(tuner)
    restored.callbacks, restored.verbose = list(callbacks), 1 if verbose else 0
    with console(verbose), environ(pending_trials(spec)):
        return tuner.fit()


def check_cluster(spec: SweepSpec, storage: str | None = None) -> None:
    """On an attached cluster: refuse a local storage path that some node cannot see, before
    any trial starts (``cae.cluster.check_shared_storage`` raises a ValueError naming them)."""
    from cae.cluster import check_shared_storage

    check_shared_storage(storage or spec.storage,
                         {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu})

"""A SweepSpec becomes a Ray Tune run: search space, scheduler, resources, storage; resume.

Before Ray starts, every grid point is validated (``check_spec``): an impossible
architecture anywhere in the grid is an error naming the field and the point, and nothing
is started or written. ``summarize`` is the dry run's content.
"""

from __future__ import annotations

import itertools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cae.config import DATASET_TRAIN_SIZES, SweepSpec, TrialConfig, UserError, apply_point

SPEC_FILE = "spec.yaml"
METRIC, MODE = "val_loss", "min"


class SpecError(UserError, ValueError):
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
    max_epochs: int = 0
    train_images: int = 0


def check_spec(spec: SweepSpec) -> Checked:
    """Validate the base trial and every grid point (with the ends of random ranges)."""
    axes = spec.axes()
    keys = list(axes)
    values = [_validation_values(*axes[k]) for k in keys]
    n_points = 1
    for k in keys:
        if axes[k][0] == "grid":
            n_points *= len(axes[k][1])
    checked = Checked(spec, n_points, n_points * spec.num_samples)
    seen: dict[str, TrialConfig] = {}
    for combo in itertools.product(*values):
        point = dict(zip(keys, combo))
        try:
            data = apply_point(json.loads(json.dumps(spec.trial)), point)
        except ValueError as exc:
            raise SpecError(f"space.{exc}") from None
        cache_key = json.dumps(data, sort_keys=True)
        if cache_key in seen:
            continue
        try:
            cfg = TrialConfig.model_validate(data)
        except ValidationError as exc:
            from cae.cli import format_validation_error

            msg = format_validation_error(exc).removeprefix("invalid config: ")
            where = f"at grid point {_label(point)}" if point else "in the base trial"
            raise SpecError(f"{msg} ({where})") from None
        seen[cache_key] = cfg
        arch = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
        checked.models.setdefault(arch, (cfg, point))
        checked.max_epochs = max(checked.max_epochs, cfg.max_epochs)
        size = DATASET_TRAIN_SIZES[cfg.data.dataset]
        if cfg.data.train_limit:
            size = min(size, cfg.data.train_limit)
        checked.train_images = max(checked.train_images, int(size * (1 - cfg.data.val_fraction)))
    sched = spec.scheduler
    if sched.kind == "asha" and sched.max_t is not None and sched.max_t < checked.max_epochs:
        raise SpecError(
            f"scheduler.max_t ({sched.max_t}) is below trial max_epochs ({checked.max_epochs}); "
            "ASHA would cut every trial before its test evaluation: raise max_t or lower "
            "max_epochs"
        )
    return checked


def summarize(checked: Checked) -> str:
    """The dry run: trials, distinct architectures with params and latent size, the work."""
    from cae.arch import describe

    spec = checked.spec
    swept = [k for k, (kind, _) in spec.axes().items() if kind != "fixed"]
    lines = [
        f"sweep {spec.name}: {checked.n_trials} trials ({checked.n_points} grid points x "
        f"{spec.num_samples} samples), scheduler {spec.scheduler.kind}",
        f"distinct architectures: {len(checked.models)}",
        f"  {'params':>10} {'latent':>7}  grid point",
    ]
    rows = []
    for cfg, point in checked.models.values():
        info = describe(cfg.model)
        label = ", ".join(f"{k}={json.dumps(v)}" for k, v in point.items()
                          if k.startswith(("model.", "variant")))
        rows.append((info["params"], info["latent_size"], label or cfg.model.preset or "base"))
    for params, latent, label in sorted(rows, key=lambda r: (r[1], r[0])):
        lines.append(f"  {params:>10,} {latent:>7}  {label}")
    trial_epochs = checked.n_trials * checked.max_epochs
    lines.append(
        f"work: at most {trial_epochs:,} trial-epochs ({checked.n_trials} x "
        f"{checked.max_epochs}), {trial_epochs * checked.train_images:,} training images"
        + ("; ASHA stops weak trials early" if spec.scheduler.kind == "asha" else "")
    )
    lines.append(f"swept axes: {', '.join(swept) or 'none'}")
    lines.append(f"resources per trial: {spec.resources.cpu:g} cpu, {spec.resources.gpu:g} gpu")
    return "\n".join(lines)


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
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch", max_t=s.max_t or max_epochs, grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def wrapped_trainable(spec: SweepSpec, data):
    from ray import tune

    from cae.trainable import run_trial

    fn = tune.with_parameters(run_trial, base=spec.trial, data=data,
                              threads=max(1, int(spec.resources.cpu)))
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def run_config(spec: SweepSpec, name: str, storage: str):
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1,
    )


def storage_uri(storage: str) -> str:
    """Ray wants an absolute local path or a URI."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def init_ray(address: str | None, dashboard: bool = False) -> bool:
    """Attach to a cluster (``--address``, or the one a Ray job runs in), or start Ray
    in-process on 127.0.0.1, with the dashboard (http://127.0.0.1:8265) only if asked.
    Returns whether this call initialised Ray (False if it already was)."""
    attach = address or os.environ.get("RAY_ADDRESS")
    if not attach:
        # Ray's single-machine mode: every server binds to the loopback address only (read
        # when ray is first imported; tests/conftest.py sets it for in-process runs).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Tune snapshots the experiment state every couple of checkpoints of a trial
        # (CheckpointConfig.num_to_keep) and warns when that happens within seconds; on a
        # local disk a snapshot is a file copy (benchmarks/overhead.py: 6.5 ms per epoch
        # for report and checkpoint together), so the warning is only noise here.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
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


def run_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def save_spec(run_dir: str, spec: SweepSpec) -> None:
    """Write the resolved spec beside Ray Tune's files (local dirs or any pyarrow URI)."""
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    if "://" in run_dir:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(run_dir)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{SPEC_FILE}") as f:
            f.write(text.encode())
    else:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / SPEC_FILE).write_text(text)


def load_run_spec(run_dir: str) -> SweepSpec:
    """The spec a run directory (a local path or a URI) ran with."""
    missing = SpecError(f"{run_dir} is not a cae run directory (no {SPEC_FILE} in it)")
    if "://" in run_dir:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(run_dir)
        if fs.get_file_info(f"{path}/{SPEC_FILE}").type != pafs.FileType.File:
            raise missing
        with fs.open_input_stream(f"{path}/{SPEC_FILE}") as f:
            text = f.read().decode()
    else:
        path = Path(run_dir) / SPEC_FILE
        if not path.is_file():
            raise missing
        text = path.read_text()
    return SweepSpec.model_validate(yaml.safe_load(text))


def fit(spec: SweepSpec, data, name: str, storage: str, checked: Checked):
    """Run the sweep to the end; returns Ray Tune's ResultGrid."""
    from ray import tune

    tuner = tune.Tuner(
        wrapped_trainable(spec, data),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, scheduler=scheduler(spec, checked.max_epochs),
            num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent,
            reuse_actors=True,  # skip a process start and the torch import per trial
        ),
        run_config=run_config(spec, name, storage),
    )
    return tuner.fit()


def resume(run_dir: str, spec: SweepSpec, data):
    """Continue an interrupted sweep: unfinished trials go on from their checkpoints;
    finished ones are not run again; errored ones stay errors."""
    from ray import tune

    tuner = tune.Tuner.restore(run_dir, trainable=wrapped_trainable(spec, data),
                               resume_unfinished=True, resume_errored=False)
    return tuner.fit()


def check_cluster(spec: SweepSpec, storage: str | None = None) -> None:
    """On an attached cluster: refuse a local storage path that some node cannot see, before
    any trial starts (``cae.cluster.check_shared_storage`` raises a ValueError naming them)."""
    from cae.cluster import check_shared_storage

    check_shared_storage(storage or spec.storage,
                         {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu})

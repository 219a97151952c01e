"""A sweep spec checked and planned before Ray starts: every grid point validated, the
architectures and datasets it needs, the memory per trial and the disk it will fill.

``check_spec`` validates the base trial and every grid point (with the ends of random
ranges): an impossible architecture anywhere in the grid is an error naming the field and
the point, and nothing is started or written. The dry run prints what it finds
(``cae.sweep.dryrun``); ``cae sweep`` refuses a sweep that cannot fit before any trial starts.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cae.config.catalog import USER_DATASETS
from cae.config.errors import UserError, format_validation_error
from cae.config.points import apply_point
from cae.config.spec import AXIS_KINDS, SweepSpec, stratum_of
from cae.config.trial import DataConfig, TrialConfig, absolute_path
from cae.model.memory import estimate, trial_budget
from cae.run import diskspace

# More grid points than this is a typo or a spec for another tool; checking is linear.
MAX_GRID_POINTS = 1_000_000


class SpecError(UserError):
    """A sweep spec that cannot run; the message names the field (and the grid point)."""


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
    disk: diskspace.DiskEstimate | None = None  # what the sweep writes to its storage
    # source key -> what the check read of a user's dataset (its headers, the cache's record
    # or the spec's recorded facts): ``record_data_facts`` compares the images as loaded
    facts: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # legal, but worth saying before a run


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


def _sizes(spec: SweepSpec) -> tuple[int, int]:
    """(grid points, combinations to check), refusing a space too large to check."""
    axes = spec.axes()
    for key, (kind, _arg) in axes.items():
        if key.startswith("data.") and kind not in ("fixed", "grid", "choice"):
            raise SpecError(f"space.{key}: a data setting can be fixed, a grid or a choice, "
                            f"not {kind} (each distinct dataset is loaded before the sweep)")
    n_points = n_checks = 1
    for kind, arg in axes.values():
        n_points *= len(arg) if kind == "grid" else 1
        n_checks *= len(_validation_values(kind, arg))
    if max(n_points, n_checks) > MAX_GRID_POINTS:
        raise SpecError(f"space: {max(n_points, n_checks):,} combinations of the axes to run or "
                        f"check; the limit is {MAX_GRID_POINTS:,}: split the sweep")
    return n_points, n_checks


def _settings(spec: SweepSpec, point: dict) -> dict:
    """The base trial with one combination of the axes applied (not yet validated)."""
    try:
        return apply_point(json.loads(json.dumps(spec.trial)), point)
    except UserError as exc:
        raise SpecError(f"space.{exc}") from None


def _validate(data: dict, where: str) -> TrialConfig:
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as exc:
        msg = format_validation_error(exc).removeprefix("invalid config: ")
        raise SpecError(f"{msg} ({where})") from None


def _add(checked: Checked, cfg: TrialConfig, point: dict, where: str) -> None:
    """Count one distinct configuration in: its dataset, architecture, memory and size."""
    checked.datasets.setdefault(cfg.data.source_key(), cfg.data)
    arch = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
    checked.models.setdefault(arch, (cfg, point))
    need = estimate(cfg)
    checked.memory[arch] = max(checked.memory.get(arch, 0), need.total)
    budget = checked.budget
    if budget is not None and need.total > budget[0]:
        raise SpecError(
            f"{where}: a trial needs about {need.total / 2**20:,.0f} MiB ({need}) but may "
            f"use {budget[0] / 2**20:,.0f} MiB ({budget[1]}); lower batch_size, the "
            "model's size or data.train_limit, or give each trial more resources")
    checked.max_epochs = max(checked.max_epochs, cfg.max_epochs)
    size, _ = cfg.data.sizes()  # the registry's, or what a user's files hold
    checked.train_images = max(checked.train_images, int(size * (1 - cfg.data.val_fraction)))


def _check_scheduler(spec: SweepSpec, checked: Checked, to_run: bool) -> None:
    sched = spec.scheduler
    if sched.kind != "fifo" and sched.max_t is not None and sched.max_t < checked.max_epochs:
        raise SpecError(
            f"scheduler.max_t ({sched.max_t}) is below trial max_epochs ({checked.max_epochs}); "
            "the scheduler would cut every trial before its test evaluation: raise max_t or "
            "lower max_epochs")
    if to_run:
        check_search(spec)
    if sched.kind == "sha" and spec.max_concurrent is not None:
        raise SpecError("max_concurrent: not with scheduler.kind 'sha' (Ray counts the trials "
                        "paused at a rung as running, so the sweep could wait forever); limit "
                        "concurrency through resources.cpu / resources.gpu instead")


def schedule_notes(spec: SweepSpec, cfg: TrialConfig) -> list[str]:
    """What may keep a trial's learning-rate schedule from acting: ``plateau`` lowers the
    rate after ``plateau_patience`` + 1 epochs without improvement, and a trial stopped
    sooner (by its own patience, or by the scheduler at its grace period) never sees it."""
    s, notes = cfg.schedule, []
    if s.name != "plateau":
        return notes
    waits = s.plateau_patience + 1
    if cfg.patience is not None and cfg.patience <= waits:
        notes.append(f"schedule 'plateau' lowers the rate after {waits} epochs without "
                     f"improvement, and patience ({cfg.patience}) stops the trial by then: "
                     "the schedule may never act")
    grace = spec.scheduler.grace_period
    if spec.scheduler.kind != "fifo" and grace is not None and grace <= waits:
        notes.append(f"schedule 'plateau' waits {waits} epochs and the scheduler may stop "
                     f"trials at epoch {grace} (scheduler.grace_period): for those the "
                     "schedule may never act")
    return notes


def check_spec(spec: SweepSpec, budget: tuple[int, str] | None = None,
               to_run: bool = True) -> Checked:
    """Validate the base trial and every grid point (with the ends of random ranges).

    ``budget`` (bytes, and of what: see ``cae.model.memory.trial_budget``) refuses a grid point
    whose trial would not fit its share of the device. ``to_run=False`` reads a run's spec
    without running it here (``cae status``): its searcher's package need not be
    installed."""
    n_points, n_checks = _sizes(spec)
    checked = Checked(spec, n_points, n_points * spec.num_samples, budget=budget)
    axes = spec.axes()
    keys = list(axes)
    seen: dict[str, TrialConfig] = {}
    counts: Counter[str] = Counter()
    for combo in itertools.product(*(_validation_values(*axes[k]) for k in keys)):
        point = dict(zip(keys, combo))
        data = _settings(spec, point)
        key = json.dumps(data, sort_keys=True)
        counts[key] += 1
        if key not in seen:  # one validation per distinct configuration
            where = f"at grid point {_label(point)}" if point else "in the base trial"
            seen[key] = _validate(data, where)
            _add(checked, seen[key], point, where)
    _check_scheduler(spec, checked, to_run)
    checked.notes = sorted({n for cfg in seen.values() for n in schedule_notes(spec, cfg)})
    checked.strata = strata(spec)
    # each combination stands for an equal share of the trials
    checked.disk = diskspace.estimate(
        [(seen[k], n * checked.n_trials / n_checks) for k, n in counts.items()],
        fused=spec.fusion() is not None)
    checked.facts = _user_facts(checked)
    return checked


def _user_facts(checked: Checked) -> dict[str, dict]:
    """The facts each user dataset was validated with (found once per process already)."""
    from cae.data.userdata import facts

    return {key: facts(cfg) for key, cfg in checked.datasets.items()
            if cfg.dataset in USER_DATASETS}


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
    if version is None or parts < [3, 6]:
        found = "it is not installed" if version is None else f"found {version}"
        raise SpecError(f"search.kind: 'optuna' needs the optuna package >= 3.6 ({found}); "
                        "install it with pip install 'optuna>=3.6'")


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


def local_budget(spec: SweepSpec) -> tuple[int, str] | None:
    """What one trial of ``spec`` may use on this machine
    (``cae.model.memory.trial_budget``)."""
    return trial_budget(spec.resources.cpu, spec.resources.gpu)


def attached(address: str | None) -> bool:
    """Whether the sweep runs on a cluster (``--address``, or the ``RAY_ADDRESS`` a Ray job
    sets) rather than on this machine."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def budget_for(spec: SweepSpec, address: str | None) -> tuple[int, str] | None:
    """What one trial may use: this machine's share (:func:`local_budget`) for a local
    sweep, None for one on a cluster (this machine's memory says nothing of its nodes')."""
    return None if attached(address) else local_budget(spec)


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


def smoke(spec: SweepSpec) -> SweepSpec:
    """The spec cut down to a smoke run (``cae sweep --smoke``): two trials (the first two
    values of its first grid axis with two, the first of the others), one epoch, a few
    hundred images, every trial to its end; everything else (model, task, report) as the
    spec says, so a broken install fails in a minute."""
    data = spec.model_dump(mode="json")
    space, split = {}, False
    for key, (kind, arg) in spec.axes().items():
        if kind == "grid":
            space[key] = {"grid": arg[:2] if not split and len(arg) >= 2 else arg[:1]}
            split = split or len(arg) >= 2
        else:
            space[key] = data["space"][key]
    trial = json.loads(json.dumps(data["trial"]))
    trial.setdefault("data", {}).update(train_limit=300, test_limit=200)
    trial.update(max_epochs=1)
    data.update(name=f"{spec.name}-smoke", space=space, trial=trial, num_samples=1,
                scheduler={"kind": "fifo"})
    if data["search"]["kind"] == "optuna":
        data["search"] = {"kind": "grid"}
    return SweepSpec.model_validate(data)


# ---- data ------------------------------------------------------------------------------


def _trial_data(spec: SweepSpec) -> dict:
    """The base trial's ``data`` mapping, where the sweep records what it found (made if
    the spec has none)."""
    data = spec.trial.setdefault("data", {})
    if not isinstance(data, dict):
        raise SpecError("trial.data must be a mapping")
    return data


def record_data_dir(spec: SweepSpec, data_dir: str | None) -> bool:
    """Write where the sweep's datasets live into ``spec.trial`` (so the run directory's
    spec says it, and ``cae report`` and ``cae resume`` read the same files): ``data_dir``,
    else the default root (``$CAE_DATA_DIR`` or the cache). Nothing is recorded for a sweep
    on the embedded sample alone, nor into a base trial whose ``data`` is not a mapping (the
    check says what is wrong with it). Called before :func:`check_spec`, so that the check
    validates what the trials will run. Returns whether the spec changed."""
    from cae.data.datasets import data_root

    data = spec.trial.get("data", {})
    if not isinstance(data, dict) or (data.get("data_dir") and not data_dir):
        return False
    if not data_dir and dataset_names(spec) <= {"sample"}:
        return False
    data = _trial_data(spec)
    data["data_dir"] = str(data_root(data_dir).resolve())
    return True


def dataset_names(spec: SweepSpec) -> set[str]:
    """Every dataset the sweep's trials name (``data.dataset`` with each combination of the
    axes that can set it), read from the spec as written, before any validation; "?" for
    one the check will refuse."""
    axes = spec.axes()
    keys = [k for k, (kind, arg) in axes.items() if _sets_dataset(k, kind, arg)]
    names = set()
    try:
        for combo in itertools.product(*(_validation_values(*axes[k]) for k in keys)):
            data = _settings(spec, dict(zip(keys, combo))).get("data", {})
            names.add(data.get("dataset", "sample") if isinstance(data, dict) else "?")
    except (UserError, TypeError, AttributeError):
        names.add("?")
    return names


def _sets_dataset(key: str, kind: str, arg: Any) -> bool:
    """Whether an axis can set ``data.dataset``: itself, ``data`` whole, or a variant."""
    if key in ("data", "data.dataset"):
        return True
    values = _validation_values(kind, arg) if key.startswith("variant") else []
    return any(isinstance(v, dict) and ("data" in v or "data.dataset" in v) for v in values)


def record_data_facts(spec: SweepSpec, checked: Checked) -> bool:
    """Write into ``spec.trial`` what each user dataset (``cae.data.userdata``) was found to hold
    once loaded (shape, counts, skipped files), and its paths made absolute (in the space's
    values too), so that trials validate their configs on any node without the files, and
    the run's spec says what was read. Call after :func:`load_datasets`. Returns whether the
    images as loaded differ from what the check validated with (``checked.facts``) in what
    validation reads: then check the spec again, since the exact facts can refuse what the
    headers could not (colorize on images that all turned out grayscale, fewer readable
    images than one batch)."""
    from cae.data.userdata import loaded_facts

    users = {key: cfg for key, cfg in checked.datasets.items()
             if cfg.dataset in USER_DATASETS}
    if not users:
        return False
    _absolute_data_paths(spec)
    exact = {key: loaded_facts(cfg) for key, cfg in users.items()}
    _trial_data(spec)["facts"] = list(exact.values())
    return any(key not in checked.facts or _validated(checked.facts[key]) != _validated(f)
               for key, f in exact.items())


def _validated(facts: dict) -> tuple:
    """What validating a trial reads of a user dataset's facts (``DataConfig.info``,
    ``cae.config.datachecks``)."""
    return (list(facts["shape"]), facts["images"], facts["test_images"],
            bool(facts.get("grayscale")))


def _absolute_data_paths(spec: SweepSpec) -> None:
    """``data.path`` and ``data.test_path`` as absolute paths wherever the spec sets them
    (the base trial, an axis, a variant), as ``DataConfig`` itself reads them here."""
    keys = ("data.path", "data.test_path")

    def fix(value: Any) -> Any:
        return absolute_path(value) if isinstance(value, str) else value

    def fix_axis(value: Any, each) -> Any:
        kind = next(iter(value)) if isinstance(value, dict) and len(value) == 1 else None
        if kind in AXIS_KINDS and isinstance(value[kind], list):
            return {kind: [each(v) for v in value[kind]]}
        return each(value)

    def fix_variant(mapping: Any) -> Any:
        if not isinstance(mapping, dict):
            return mapping
        return {k: fix(v) if k in keys else v for k, v in mapping.items()}

    data = spec.trial.get("data")
    for key in ("path", "test_path"):
        if isinstance(data, dict) and data.get(key):
            data[key] = fix(data[key])
    for axis, value in list(spec.space.items()):
        if axis in keys:
            spec.space[axis] = fix_axis(value, fix)
        elif axis.startswith("variant"):
            spec.space[axis] = fix_axis(value, fix_variant)


def load_datasets(checked: Checked) -> dict:
    """Every distinct dataset of the sweep, loaded once on the driver (source key ->
    ``ImageData``); trials receive them through Ray's object store."""
    from cae.data.datasets import load

    return {key: load(cfg) for key, cfg in checked.datasets.items()}

"""A sweep spec, typed and validated: a base trial, the axes to search over, the scheduler,
resources, search, fusion, storage and the experiment trackers (one trial's configuration
is ``cae.config.trial``).

Like every config it is a pydantic model with ``extra="forbid"``: a misspelt key is an
error naming the field. ``load_spec`` reads a YAML file with ``--set`` overrides.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cae.config.base import Strict
from cae.config.errors import UserError, validate
from cae.config.points import REPEAT_KEY, parse_overrides, set_dotted
from cae.config.yamlfile import load_yaml


def stratum_of(config: dict, keys: list[str] | tuple[str, ...]) -> tuple:
    """The values of ``keys`` in a flat trial config, directly or in a ``variant*`` mapping
    (the later wins, as in ``cae.config.points.apply_point``); lists and dicts as JSON
    (hashable)."""
    out = []
    for key in keys:
        found = [v[key] if k != key else v for k, v in config.items() if k == key or (
            k.startswith("variant") and isinstance(v, dict) and key in v)]  # in applied order
        if not found:
            raise ValueError(f"scheduler.stratify: {key!r} is not an axis of the search space "
                             f"(the trial config has {', '.join(sorted(config)) or 'no keys'})")
        value = found[-1]
        out.append(json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value)
    return tuple(out)


AXIS_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which successive halving decides: ``grace_period * rf^k`` (rounded
    up, each once) below ``max_t``."""
    out, k = [], 0
    while (r := math.ceil(grace_period * reduction_factor**k - 1e-9)) < max_t:
        out += [] if r in out else [r]
        k += 1
    return out


class SchedulerConfig(Strict):
    """Early stopping on epochs: successive halving stops weak trials at rungs (epochs
    ``grace_period * reduction_factor^k``), or FIFO runs every trial to its end.

    ``asha`` is Ray Tune's asynchronous successive halving: a trial reaching a rung is
    promoted at once if it is in the top 1/reduction_factor of those seen there so far, so
    the first trials to arrive decide. ``sha`` is synchronous: a rung is decided once every
    trial (of the stratum) has reached it, paused ones resuming from their checkpoints, so
    the outcome does not depend on trial order. ``stratify`` (grid axes of ``space``) runs
    the halving separately per combination of their values, so that each stratum's best (the
    best model at each latent size, say) is trained to the end. ``work_ahead`` (``sha``
    only) keeps workers busy while a rung waits for its last trials, without changing a
    decision (``cae.schedule.halving.SyncHalvingScheduler``).
    """

    kind: Literal["asha", "sha", "fifo"] = "asha"
    stratify: list[str] = Field(default_factory=list)
    max_t: int | None = Field(None, ge=1, le=100_000)
    grace_period: int = Field(1, ge=1, le=100_000)
    reduction_factor: float = Field(3.0, gt=1.0, le=1000.0)
    work_ahead: bool = True


class ResourcesConfig(Strict):
    """Resources of one trial; a fractional ``gpu`` packs several trials on one GPU."""

    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> ResourcesConfig:
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"gpu: above 1 it must be a whole number (got {self.gpu})")
        return self


class SearchConfig(Strict):
    """How the random axes of ``space`` are drawn.

    ``grid`` (the default): every grid point ``num_samples`` times, the random axes drawn
    independently with the spec's seed, all in a seeded shuffled order. ``optuna``: the random
    axes (uniform, loguniform, randint, choice) are proposed by Optuna's TPE, which learns
    from the trials already finished; each grid point gets its own TPE search of
    ``num_samples`` trials (its first ``startup_trials`` drawn at random; default
    ``max(2, min(10, num_samples // 3))``), seeded from the spec's seed (Optuna >= 3.6, a
    dependency of cae-sweep).
    """

    kind: Literal["grid", "optuna"] = "grid"
    startup_trials: int | None = Field(None, ge=1, le=100_000)

    def startup(self, num_samples: int) -> int:
        """Trials of each grid point drawn at random before TPE takes over (Optuna's own
        default, 10, would leave a small budget nothing to learn with)."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(2, min(10, num_samples // 3))


class FuseConfig(Strict):
    """Trials that differ only in what leaves tensor shapes alone (seed, learning rate,
    weight decay, dropout rates, penalties, loss; see ``cae.train.packing``) train together as one
    fused pack of up to ``max_members``, one Ray Tune trial per pack (``cae.train.pack``).

    ``fuse: auto`` turns it on only for trials on a GPU (``resources.gpu`` > 0 or
    ``device: cuda``): on a CPU a pack runs slower than its members one by one
    (docs/performance.md). Packs run with grid search (they are formed from trials known in
    advance) under any scheduler: members stop by their own patience or max_epochs, and
    under ``sha`` or ``asha`` each member is a trial to the halving, its survivors at each
    rung regrouped into full packs (``cae.schedule.packbook``)."""

    max_members: int = Field(32, ge=1, le=4096)
    auto: bool = False


MLFLOW_SCHEMES = ("http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql")


class MlflowTracking(Strict):
    """An MLflow tracking server (``http://host:5000``) or database (``sqlite:///mlflow.db``);
    ``experiment`` defaults to the sweep's name. MLflow's file store (``./mlruns``, a plain
    path or ``file:``) is deprecated by MLflow and refused here."""

    uri: str = Field(min_length=1)
    experiment: str | None = Field(None, min_length=1)

    @field_validator("uri")
    @classmethod
    def _not_the_file_store(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0].lower() if ":" in value else ""
        if scheme not in MLFLOW_SCHEMES:
            raise ValueError(
                f"{value!r} is not a tracking server or database: give http(s)://HOST:PORT "
                "(a server started with `mlflow server --backend-store-uri "
                "sqlite:///mlflow.db`) or sqlite:///PATH; MLflow's file store (./mlruns) is "
                "deprecated")
        return value


class WandbTracking(Strict):
    """A Weights & Biases project. ``offline`` writes each trial's run under the run
    directory's ``wandb/`` without an account or network (``wandb sync`` uploads it later);
    ``group`` defaults to the run directory's name."""

    project: str = Field(min_length=1)
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    group: str | None = Field(None, min_length=1)


class TrackingConfig(Strict):
    """Experiment trackers that get every trial of the sweep as a run (``cae.track``): its
    configuration, its losses epoch by epoch and its outcome, logged from the driver."""

    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None

    def named(self) -> list[str]:
        """The trackers this block names, in a fixed order."""
        return [name for name in ("mlflow", "wandb") if getattr(self, name) is not None]


class SweepSpec(Strict):
    """A sweep: a base trial, the axes to search over, the scheduler, resources, storage.

    ``space`` maps dotted trial keys (``model.latent_dim``) to a fixed value or to one of
    ``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (hi exclusive). Every grid point is
    crossed with ``num_samples`` draws of the random axes; over a grid, the ``num_samples``
    repeats of a point differ by their seed (``repeat`` r adds r * 1,000,003 to it). Trials
    start in an order shuffled with ``seed``, so no axis value is systematically first.
    ``search`` (:class:`SearchConfig`) says whether the random axes are drawn at random or
    proposed by a model-based search (Optuna's TPE).
    """

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    trial: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any] = Field(default_factory=dict)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    num_samples: int = Field(1, ge=1, le=100_000)
    seed: int = 0  # the order trials start in (shuffled) and the draws of random axes
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(1, ge=0)
    storage: str = "runs"
    fuse: FuseConfig | None = None  # absent: every trial on its own
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("fuse", mode="before")
    @classmethod
    def _fuse_auto(cls, value: Any) -> Any:
        return {"auto": True} if value == "auto" else value

    def fusion(self) -> int | None:
        """The most members per fused pack, or None when trials run on their own."""
        if self.fuse is None:
            return None
        device = self.trial.get("device", "auto") if isinstance(self.trial, dict) else "auto"
        on_gpu = device == "cuda" or (device == "auto" and self.resources.gpu > 0)
        return self.fuse.max_members if on_gpu or not self.fuse.auto else None

    @model_validator(mode="after")
    def _check_fusion(self) -> SweepSpec:
        if self.fusion() and self.search.kind != "grid":
            raise ValueError(
                f"fuse: packs are formed from trials known before they start, and "
                f"search.kind '{self.search.kind}' proposes each trial from the results of "
                "those before it; use search.kind: grid with fuse, or remove fuse")
        return self

    @model_validator(mode="after")
    def _check_axes(self) -> SweepSpec:
        for key, value in self.space.items():
            where = f"space.{key}"
            if not isinstance(value, dict) or not (set(value) & set(AXIS_KINDS)):
                continue  # a fixed value
            if len(value) != 1:
                raise ValueError(f"{where}: give exactly one of {', '.join(AXIS_KINDS)}")
            kind, arg = next(iter(value.items()))
            if kind in ("grid", "choice"):
                if not isinstance(arg, list) or not arg:
                    raise ValueError(f"{where}: {kind} needs a non-empty list of values")
                continue
            if not (isinstance(arg, list) and len(arg) == 2
                    and all(isinstance(v, (int, float)) for v in arg) and arg[0] < arg[1]):
                raise ValueError(f"{where}: {kind} needs [low, high] with low < high")
            if kind == "loguniform" and arg[0] <= 0:
                raise ValueError(f"{where}: loguniform needs low > 0")
            if kind == "randint" and not all(isinstance(v, int) for v in arg):
                raise ValueError(f"{where}: randint needs whole numbers")
        axes = self.axes()
        for key in self.scheduler.stratify:
            in_variant = any(
                kind == "grid" and all(isinstance(v, dict) and key in v for v in arg)
                for k, (kind, arg) in axes.items() if k.startswith("variant"))
            if axes.get(key, ("",))[0] != "grid" and not in_variant:
                raise ValueError(f"scheduler.stratify: {key!r} must be a grid axis of space "
                                 "(or a key set by a grid of variants)")
        if REPEAT_KEY in self.space:
            raise ValueError(f"space.{REPEAT_KEY}: reserved for the repeats of num_samples")
        if self.search.kind == "optuna":
            if not any(kind in AXIS_KINDS[1:] for kind, _ in axes.values()):
                raise ValueError("search.kind: 'optuna' proposes the random axes of space "
                                 f"({', '.join(AXIS_KINDS[1:])}) and this space has none: "
                                 "add one or use kind 'grid'")
            if self.scheduler.kind == "sha":
                raise ValueError(
                    "search.kind: 'optuna' cannot learn under scheduler.kind 'sha': "
                    "synchronous halving decides its first rung only once every trial has "
                    "been proposed, so no trial ends before TPE's last proposal; use "
                    "scheduler.kind 'asha' or 'fifo' with optuna")
        return self

    def axes(self) -> dict[str, tuple[str, Any]]:
        """Every axis as ``(kind, argument)``; a fixed value is ``("fixed", value)``."""
        out = {}
        for key, value in self.space.items():
            if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in AXIS_KINDS:
                out[key] = next(iter(value.items()))
            else:
                out[key] = ("fixed", value)
        return out

    def swept(self) -> list[str]:
        """The axes that vary (grid, choice or a random range), in the spec's order."""
        return [k for k, (kind, _) in self.axes().items() if kind != "fixed"]


def load_spec(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """Load a sweep spec YAML and apply ``--set`` overrides.

    ``--set trial.lr=0.01`` sets a base trial key; ``--set space.model.latent_dim=[4, 8]``
    replaces one axis (its key is everything after ``space.``).
    """
    data = load_yaml(path)
    for key, value in parse_overrides(overrides or []).items():
        if key.startswith("space."):
            space = data.setdefault("space", {})
            if not isinstance(space, dict):
                raise UserError(f"{path}: space must be a mapping of dotted keys")
            space[key.removeprefix("space.")] = value
        elif key.startswith("trial."):
            set_dotted(data.setdefault("trial", {}), key.removeprefix("trial."), value)
        else:
            set_dotted(data, key, value)
    return validate(SweepSpec, data, path)

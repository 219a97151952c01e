"""Schedulers and searchers of a sweep, extending Ray Tune through its own interfaces, in a
registry by the spec's names (as Ray Tune's ``SCHEDULER_IMPORT`` and ``create_scheduler``):
``scheduler.kind`` -> ``SCHEDULERS``, ``search.kind`` -> ``SEARCHERS``.

- ``rungbook``: successive halving's book of one stratum (which trials go on from a rung);
- ``halving``: synchronous successive halving as a Tune scheduler (``sha``);
- ``workahead``: working ahead, training on while a rung waits (``sha`` with ``work_ahead``);
- ``schedulers``: one scheduler per stratum (``asha``, ``sha``), speculation marks;
- ``grid``: grid search in a seeded shuffled order (``grid``);
- ``search``: one TPE search per grid point (``optuna``).

Importing this package does not import Ray: each factory imports what it builds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from cae.config.spec import SweepSpec


def _fifo(stratify: Sequence[str], **_) -> TrialScheduler:
    """Every trial to the end (stratify does not matter)."""
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _stratified(make: Callable[..., TrialScheduler], stratify: Sequence[str], *, metric: str,
                mode: str, **kwargs: Any) -> TrialScheduler:
    """``make(**kwargs)`` per stratum of ``stratify`` (``StratifiedScheduler``)."""
    from cae.schedule.schedulers import StratifiedScheduler

    return StratifiedScheduler(functools.partial(make, **kwargs), stratify, metric=metric,
                               mode=mode)


def _asha(stratify: Sequence[str], *, work_ahead: bool = False, **kwargs: Any
          ) -> TrialScheduler:
    """Ray's ASHA per stratum."""
    from ray.tune.schedulers import ASHAScheduler

    return _stratified(ASHAScheduler, stratify, **kwargs)


def _sha(stratify: Sequence[str], *, work_ahead: bool = False, **kwargs: Any
         ) -> TrialScheduler:
    """Synchronous successive halving per stratum, working ahead or not
    (``cae.schedule.halving``, ``cae.schedule.workahead``)."""
    from cae.schedule.workahead import sync_halving

    return _stratified(sync_halving, stratify, work_ahead=work_ahead, **kwargs)


# scheduler.kind -> its factory: (stratify, max_t=, grace_period=, reduction_factor=,
# metric=, mode=, time_attr=, work_ahead=) -> the sweep's scheduler
SCHEDULERS: dict[str, Callable[..., TrialScheduler]] = {
    "asha": _asha, "sha": _sha, "fifo": _fifo,
}


def create_scheduler(kind: str, stratify: Sequence[str] = (), *, max_t: int,
                     grace_period: int, reduction_factor: float, metric: str = "val_loss",
                     mode: str = "min", time_attr: str = "epoch", work_ahead: bool = False
                     ) -> TrialScheduler:
    """The scheduler of a sweep: ``asha`` (Ray's ASHA) or ``sha`` (synchronous; with
    ``work_ahead``, see ``cae.schedule.workahead``) per stratum of ``stratify``, or ``fifo``
    (every trial to the end; stratify does not matter)."""
    factory = SCHEDULERS.get(kind)
    if factory is None:
        raise ValueError(f"scheduler.kind: {kind!r} is not one of {', '.join(SCHEDULERS)}")
    return factory(stratify, max_t=max_t, grace_period=grace_period,
                   reduction_factor=reduction_factor, metric=metric, mode=mode,
                   time_attr=time_attr, work_ahead=work_ahead)


def _grid(spec: SweepSpec, param_space: dict) -> tuple[Searcher, int]:
    """Every grid point x num_samples (repeats with their own seeds), in a seeded shuffled
    order, so that no axis value systematically starts first (``cae.schedule.grid``)."""
    from cae.schedule.grid import shuffled_search

    search = shuffled_search(param_space, spec.num_samples, spec.seed)
    return search.search_alg, search.num_samples


def _optuna(spec: SweepSpec, param_space: dict) -> tuple[Searcher, int]:
    """One TPE search per grid point (``cae.schedule.search``)."""
    from cae.schedule.search import optuna_search

    searcher = optuna_search(spec)
    return searcher, searcher.total


# search.kind -> its factory: (spec, param_space) -> (searcher, trials it hands out)
SEARCHERS: dict[str, Callable[[SweepSpec, dict], tuple[Searcher, int]]] = {
    "grid": _grid, "optuna": _optuna,
}


def create_searcher(spec: SweepSpec, param_space: dict) -> tuple[Searcher, int]:
    """The searcher of a sweep (by ``spec.search.kind``) and the number of trials it hands
    out; Tune's own ``param_space`` stays empty (the searcher hands out whole trial
    configs). ``param_space`` is ``cae.sweep.tuner.param_space``."""
    return SEARCHERS[spec.search.kind](spec, param_space)

"""Model-based search (``search: {kind: optuna}``): Optuna's TPE proposes the random axes,
one TPE search per grid point, through Ray Tune's ``OptunaSearch``.

The grid stays a grid: a single TPE study cannot hold a grid (Ray's ``OptunaSearch`` refuses
``grid_search``), and folding a grid axis into TPE as a categorical would let it spend the
budget on some grid points and skip others, which breaks ``scheduler.stratify`` and the
"best at each latent size" answer. So each grid point gets its own ``OptunaSearch`` with a
budget of ``num_samples`` trials, learning only from that point's trials; trials are handed
out round-robin over the points (in an order shuffled with the spec's seed), so every point
gets its k-th trial before any gets its (k+1)-th. The scheduler (ASHA or FIFO) still decides
when a trial stops; TPE learns from each trial's ``best_val_loss`` per epoch and when it ends
(a trial stopped early counts as pruned at its last epoch). Tune saves the searcher's state
with the experiment (``save``/``restore``), so ``cae resume`` goes on with the same studies.
"""

from __future__ import annotations

import itertools
import pickle
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import Searcher

from cae.config.points import REPEAT_KEY
from cae.config.spec import SweepSpec
from cae.run.outcomes import OWN_ENDS
from cae.sweep.internals import optuna_study

# What TPE minimises per trial: the best validation loss it reached before it ended (the
# scheduler's metric ``val_loss`` is the latest epoch's).
OBJECTIVE = "best_val_loss"
RANDOM_KINDS = ("uniform", "loguniform", "randint", "choice")


def _domain(kind: str, arg: Any):
    """The Tune domain of a random axis; a choice is over the indices of its values, so
    that lists and mappings (channels, variants) work as categories too."""
    if kind == "choice":
        return tune.choice(list(range(len(arg))))
    if kind == "randint":
        return tune.randint(*arg)
    return tune.loguniform(*arg) if kind == "loguniform" else tune.uniform(*arg)


class GridTPESearcher(Searcher):
    """Every grid point ``num_samples`` times, the random axes proposed per point by its own
    ``OptunaSearch`` (TPE, seeded); see the module docstring. Built by ``optuna_search``."""

    def __init__(self, axes: dict[str, tuple[str, Any]], num_samples: int, seed: int,
                 n_startup: int, metric: str = "val_loss", mode: str = "min"):
        super().__init__(metric=metric, mode=mode)
        self._axes, self._samples = axes, num_samples
        grid = [k for k, (kind, _) in axes.items() if kind == "grid"]
        points = [dict(zip(grid, combo))
                  for combo in itertools.product(*(axes[k][1] for k in grid))]
        rng = np.random.default_rng(seed)
        self._points = [points[i] for i in rng.permutation(len(points))]
        seeds = rng.integers(0, 2**31 - 1, size=len(points))
        self._random = {k: _domain(kind, arg) for k, (kind, arg) in axes.items()
                        if kind in RANDOM_KINDS}
        self._subs = [self._make_sub(int(s), n_startup) for s in seeds]
        self._next = 0  # trials handed out
        self._owner: dict[str, int] = {}  # trial id -> index of its grid point

    def _make_sub(self, seed: int, n_startup: int):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study created
        space = OptunaSearch.convert_search_space(self._random)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
        return OptunaSearch(space=space, metric=OBJECTIVE, mode=self.mode, sampler=sampler)

    @property
    def total(self) -> int:
        return len(self._points) * self._samples

    def suggest(self, trial_id: str) -> dict | None:
        if self._next >= self.total:
            return Searcher.FINISHED
        index, repeat = self._next % len(self._points), self._next // len(self._points)
        self._next += 1
        self._owner[trial_id] = index
        proposed = self._subs[index].suggest(trial_id)
        config = {}
        for key, (kind, arg) in self._axes.items():
            if kind == "grid":
                config[key] = self._points[index][key]
            elif kind == "choice":
                config[key] = arg[proposed[key]]
            elif kind == "fixed":
                config[key] = arg
            else:
                config[key] = proposed[key]
        if self._samples > 1:  # as for grid search: trial k of a point runs with seed + k*stride
            config[REPEAT_KEY] = repeat
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._owner and OBJECTIVE in result:
            self._subs[self._owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """A trial that ended by itself (max_epochs, patience) is a COMPLETE Optuna trial
        worth its best validation loss; one the scheduler stopped early is PRUNED at its last
        epoch, which TPE ranks as successive halving does: below every completed trial, the
        later the stop the better."""
        if trial_id in self._owner:
            own_end = bool(result) and result.get("stop_reason") in OWN_ENDS \
                and OBJECTIVE in result
            self._subs[self._owner[trial_id]].on_trial_complete(
                trial_id, result if own_end else None, error)

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "_random"}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def studies(self) -> list[tuple[dict, Any]]:
        """(grid point, its Optuna study): what TPE has seen, for inspection and tests."""
        return [(p, optuna_study(s)) for p, s in zip(self._points, self._subs)]


def optuna_search(spec: SweepSpec, seed: int | None = None) -> GridTPESearcher:
    """The searcher of a ``search: {kind: optuna}`` spec (Tune's ``param_space`` stays
    empty: the searcher hands out whole trial configs, fixed values included)."""
    return GridTPESearcher(spec.axes(), spec.num_samples, spec.seed if seed is None else seed,
                           spec.search.startup(spec.num_samples))

"""Grid search in a seeded shuffled order (``search.kind: grid``): every grid point
``num_samples`` times, random axes sampled, handed out in an order that no axis value
systematically leads, so that early stopping cannot decide a sweep by trial order.
"""

from __future__ import annotations

import pickle
from typing import NamedTuple

import numpy as np
from ray.tune.search import Searcher
from ray.tune.search.variant_generator import generate_variants

from cae.config.points import REPEAT_KEY


class ShuffledSearcher(Searcher):
    """Hands out a fixed list of trial configs in order (see ``shuffled_search``); Tune
    saves its state in the experiment directory, so ``Tuner.restore`` goes on from there."""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self._configs, self._next = configs, 0

    def suggest(self, trial_id: str) -> dict | None:
        if self._next >= len(self._configs):
            return Searcher.FINISHED
        self._next += 1
        return self._configs[self._next - 1]

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass  # the list is fixed: results do not change what comes next

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump((self._configs, self._next), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self._configs, self._next = pickle.load(f)


class ShuffledSearch(NamedTuple):
    """What ``tune.Tuner`` needs: ``param_space=param_space`` (empty: the searcher owns the
    space), ``tune.TuneConfig(search_alg=search_alg, num_samples=num_samples)``."""

    search_alg: ShuffledSearcher
    param_space: dict
    num_samples: int  # trials in all: grid points x repeats


def shuffled_search(param_space: dict, num_samples: int, seed: int) -> ShuffledSearch:
    """Every grid point ``num_samples`` times, random axes sampled, in a seeded random order.

    Ray's own variant generation (``generate_variants``, as the default search uses) expands
    the grid and samples ``tune.uniform`` & co. with a generator seeded by ``seed``; the
    whole list is then shuffled with it, so the same seed gives the same trials in the same
    order. Each trial's ``config`` is the resolved point: the same flat dotted keys (lists
    and ``variant*`` mappings as values) as without shuffling.

    Trade-off: a custom searcher, as Ray's BasicVariantGenerator cannot shuffle and its
    ``points_to_evaluate`` breaks on list- or dict-valued grid values. The list is built up
    front (memory grows with the trials); Ray keeps one trial pending at a time for a custom
    searcher (unless ``max_concurrent_trials`` or ``TUNE_MAX_PENDING_TRIALS_PG`` says
    otherwise), slowing the start of a big cluster sweep; trial names list every key.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1 (got {num_samples})")
    rng = np.random.default_rng(seed)
    # Over a grid, the repeats of a point differ by their ``repeat`` (and so by their seed,
    # see ``cae.config.trial.trial_config``).
    configs = [{**spec, REPEAT_KEY: r} if num_samples > 1 else spec
               for r in range(num_samples)
               for _, spec in generate_variants(param_space, random_state=rng)]
    order = rng.permutation(len(configs))
    return ShuffledSearch(ShuffledSearcher([configs[i] for i in order]), {}, len(configs))

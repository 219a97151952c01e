"""Early stopping that does not decide a sweep by trial order.

Ray's ASHA promotes whichever trial reaches an empty rung first, so the grid's first values
win. Remedies: ``StratifiedScheduler`` halves separately per stratum (e.g. per
``model.latent_dim``), so each stratum's best trains to the end; ``SyncHalvingScheduler``
(``kind: sha``) decides a rung only when the whole stratum has reached it, independent of
order; ``shuffled_search`` starts grid trials in a seeded shuffled order.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.variant_generator import generate_variants

from cae.config import REPEAT_KEY
from cae.ray_internals import keep_paused, mark_for_experiment_state
from cae.spec import rungs, stratum_of  # noqa: F401 (re-exported)


def _agree(self, metric: str | None, mode: str | None, **spec) -> bool:
    """``set_search_properties``: fill in a missing metric/mode; the same ones agree."""
    if (self._metric and metric and metric != self._metric) or (
            self._mode and mode and mode != self._mode):
        return False
    self._metric, self._mode = self._metric or metric, self._mode or mode
    return True


def _search_finished(controller) -> bool:
    """Whether every trial has been created (rungs must not be decided on a partial set)."""
    search_alg = getattr(controller, "search_alg", None)
    return search_alg is None or search_alg.is_finished()


# ---- synchronous successive halving -----------------------------------------------------


@dataclass
class _Entry:
    trial: Trial
    epoch: float = 0.0
    last: float | None = None  # latest metric value
    score: float | None = None  # value when it reached the rung it waits at
    level: int = 0  # rungs passed (promoted through)
    ended: bool = False  # completed, errored, removed or stopped


class SyncHalvingScheduler(TrialScheduler):
    """Synchronous successive halving, one bracket, rungs at epochs ``grace_period *
    reduction_factor**k`` below ``max_t``.

    A trial reaching rung k is PAUSED (checkpointed, resources freed) until every trial that
    passed rung k-1 has reached rung k or ended (an ended trial competes with its last value,
    then leaves), and the search has created all trials. Then the best ``ceil(n / rf)`` (at
    least 1) continue, the others STOP; ties go by the trial config, never by arrival. Not
    Ray's HyperBandScheduler: it fills fixed-size brackets in arrival order, drops ended
    trials from the ranking and breaks ties by arrival. Tune does not save schedulers; on
    restore the state is rebuilt from each trial's last result (past a rung = promoted).
    """

    _supports_buffered_results = False  # one result at a time: pause exactly at a rung

    def __init__(self, time_attr: str = "epoch", metric: str | None = None,
                 mode: str | None = None, max_t: int = 100, grace_period: int = 1,
                 reduction_factor: float = 3):
        super().__init__()
        if not (grace_period >= 1 and max_t >= grace_period and reduction_factor > 1):
            raise ValueError("sha needs 1 <= grace_period <= max_t and reduction_factor > 1")
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._max_t, self._rf = max_t, reduction_factor
        self.rungs = rungs(grace_period, reduction_factor, max_t)  # epochs
        self._entries: dict[str, _Entry] = {}
        self._num_stopped = 0
        self._deciding = False

    set_search_properties = _agree

    def _waiting(self, e: _Entry) -> bool:
        return not e.ended and e.level < len(self.rungs) and e.epoch >= self.rungs[e.level]

    def _rank(self, e: _Entry) -> tuple:
        value = e.score if e.score is not None else e.last
        bad = value is None or not math.isfinite(value)
        sign = 1.0 if self._mode == "min" else -1.0
        config = json.dumps(e.trial.config, sort_keys=True, default=str)
        return (bad, 0.0 if bad else sign * value, config, e.trial.trial_id)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError("SyncHalvingScheduler needs a metric and a mode ('min' or "
                             "'max'): pass them here or to tune.TuneConfig()")
        if (e := self._entries.get(trial.trial_id)) is not None:  # retried after a failure
            e.ended = False  # it keeps its rungs; it goes on from its checkpoint
            return
        e = self._entries[trial.trial_id] = _Entry(trial)
        last = trial.last_result or {}
        e.ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
        if self._time_attr in last and self._metric in last:  # restored: rebuild the state
            e.epoch, e.last = last[self._time_attr], last[self._metric]
            e.level = sum(r < e.epoch for r in self.rungs)  # continued past = promoted
            e.score = e.last if self._waiting(e) else None
            if self._waiting(e) and trial.status == Trial.PENDING:
                keep_paused(trial)  # else Tune would start it past its undecided rung

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        e = self._entries[trial.trial_id]
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        e.epoch, e.last = result[self._time_attr], result[self._metric]
        if e.epoch >= self._max_t:
            return TrialScheduler.STOP
        while e.level < len(self.rungs) and e.epoch > self.rungs[e.level]:
            # past a rung it was not decided at: a trial that went on from a checkpoint
            # newer than the state this run was restored from; it went on, so it had been
            # promoted (as on_trial_add reads a restored trial)
            e.level, e.score = e.level + 1, None
        if self._waiting(e) and e.score is None:
            e.score = e.last
        self._decide(tune_controller, current=trial)
        if e.ended:
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE if self._waiting(e) else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict | None = None) -> None:
        e = self._entries[trial.trial_id]
        if result and self._time_attr in result and self._metric in result:
            e.epoch, e.last = result[self._time_attr], result[self._metric]
        e.ended = True  # competes with its last value
        self._decide(tune_controller)

    on_trial_remove = on_trial_complete

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        # no decision now: a trial to be retried is added again right after this call;
        # the next choose_trial_to_run decides
        self._entries[trial.trial_id].ended = True

    def _decide(self, tune_controller, current: Trial | None = None) -> None:
        """Decide every rung whose population has all arrived (idempotent, not re-entrant:
        stopping a trial calls back into the scheduler)."""
        if self._deciding or not _search_finished(tune_controller):
            return
        self._deciding = True
        try:
            for k, rung in enumerate(self.rungs):
                members = [e for e in self._entries.values() if e.level >= k]
                at_rung = [e for e in members if e.level == k]
                live = [e for e in at_rung if not e.ended]
                if any(e.epoch < rung for e in live):
                    return  # someone is still on the way to this rung
                # slots left: members promoted before (known only after a restore) keep theirs
                slots = max(1, math.ceil(len(members) / self._rf)) - (len(members) - len(at_rung))
                keep = {e.trial.trial_id for e in sorted(at_rung, key=self._rank)[:max(0, slots)]}
                losers = []
                for e in live:
                    if e.trial.trial_id in keep:
                        e.level, e.score = k + 1, None
                    else:
                        e.ended = True
                        losers.append(e.trial)
                self._num_stopped += len(losers)
                for trial in losers:
                    if trial is not current and trial.status not in (Trial.TERMINATED, Trial.ERROR):
                        tune_controller.stop_trial(trial)  # PAUSED, saving, or PENDING
                        mark_for_experiment_state(tune_controller, trial)
        finally:
            self._deciding = False

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Promoted paused trials first, then new ones; a paused trial waiting at an undecided
        rung is not run. Also decides rungs that became complete when the search ended."""
        self._decide(tune_controller)
        entries = list(self._entries.values())
        for status in (Trial.PAUSED, Trial.PENDING):
            for e in entries:
                if e.trial.status == status and not e.ended and not self._waiting(e):
                    return e.trial
        return None

    def debug_string(self) -> str:
        waiting = sum(map(self._waiting, self._entries.values()))
        return f"SyncHalving: rungs {self.rungs}, {waiting} waiting, {self._num_stopped} stopped"


# ---- one scheduler per stratum ----------------------------------------------------------


class _StratumView:
    """The controller as one stratum's scheduler sees it: only that stratum's trials."""

    def __init__(self, controller, trials: list[Trial]):
        self._controller, self._trials = controller, trials

    def get_trials(self) -> list[Trial]:
        return self._trials

    def __getattr__(self, name: str):
        return getattr(self._controller, name)


class StratifiedScheduler(TrialScheduler):
    """One scheduler per stratum (``stratum_of(trial.config, stratify)``), made lazily by a
    picklable ``factory``; every callback goes to the trial's stratum's scheduler, so trials
    of different strata are never compared. No stratify keys: a single stratum. The same
    metric/mode here and in ``tune.TuneConfig`` agree (Ray's own schedulers refuse both)."""

    def __init__(self, factory: Callable[[], TrialScheduler], stratify: Sequence[str] = (),
                 metric: str | None = None, mode: str | None = None):
        super().__init__()
        self._factory, self._keys = factory, list(stratify)
        self._metric, self._mode, self._spec = metric, mode, {}
        self._supports_buffered_results = factory().supports_buffered_results
        self._strata: dict[tuple, TrialScheduler] = {}
        self._members: dict[tuple, list[Trial]] = {}
        self._stratum: dict[str, tuple] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if not _agree(self, metric, mode):
            return False
        self._spec = spec
        return all(s.set_search_properties(self._metric, self._mode, **spec)
                   for s in self._strata.values())

    def _call(self, method: str, controller, trial: Trial, *args):
        key = self._stratum[trial.trial_id]
        view = _StratumView(controller, self._members[key])
        return getattr(self._strata[key], method)(view, trial, *args)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        again = trial.trial_id in self._stratum  # a retried trial is added again
        key = self._stratum[trial.trial_id] = stratum_of(trial.config, self._keys)
        if key not in self._strata:
            self._strata[key], self._members[key] = self._factory(), []
            self._strata[key].set_search_properties(self._metric, self._mode, **self._spec)
        self._members[key] += [] if again else [trial]
        self._call("on_trial_add", tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self._call("on_trial_result", tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._call("on_trial_complete", tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._call("on_trial_error", tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._call("on_trial_remove", tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        chosen = None
        for key, sub in self._strata.items():  # every stratum: SHA decides rungs here too
            trial = sub.choose_trial_to_run(_StratumView(tune_controller, self._members[key]))
            chosen = chosen or trial
        blocked = chosen is None and not _search_finished(tune_controller)
        status = {t.status for t in tune_controller.get_trials()} if blocked else set()
        if Trial.PAUSED in status and status <= {Trial.PAUSED, Trial.TERMINATED, Trial.ERROR}:
            raise RuntimeError(  # would wait forever: fail with the reason instead
                "every unfinished trial is paused at a rung, waiting for trials the search "
                "algorithm does not create; paused trials count against max_concurrent_trials, "
                "so with sha limit concurrency with resources per trial instead")
        return chosen

    def debug_string(self) -> str:
        lines = [f"Stratified by {', '.join(self._keys) or '(one stratum)'}:"]
        lines += [f"  {k}: {s.debug_string()}" for k, s in self._strata.items()]
        return "\n".join(lines)


def make_scheduler(kind: str, stratify: Sequence[str] = (), *, max_t: int, grace_period: int,
                   reduction_factor: float, metric: str = "val_loss", mode: str = "min",
                   time_attr: str = "epoch") -> TrialScheduler:
    """The scheduler of a sweep: ``asha`` (Ray's ASHA) or ``sha`` (synchronous) per stratum
    of ``stratify``, or ``fifo`` (every trial to the end; stratify does not matter)."""
    if kind == "fifo":
        return FIFOScheduler()
    cls = {"asha": ASHAScheduler, "sha": SyncHalvingScheduler}.get(kind)
    if cls is None:
        raise ValueError(f"scheduler.kind: {kind!r} is not one of asha, sha, fifo")
    factory = functools.partial(cls, time_attr=time_attr, max_t=max_t,
                                grace_period=grace_period, reduction_factor=reduction_factor)
    return StratifiedScheduler(factory, stratify, metric=metric, mode=mode)


# ---- grid trials in a seeded shuffled order ---------------------------------------------


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
    # see ``cae.config.trial_config``).
    configs = [{**spec, REPEAT_KEY: r} if num_samples > 1 else spec
               for r in range(num_samples)
               for _, spec in generate_variants(param_space, random_state=rng)]
    order = rng.permutation(len(configs))
    return ShuffledSearch(ShuffledSearcher([configs[i] for i in order]), {}, len(configs))

"""Early stopping that does not decide a sweep by trial order.

Ray's ASHA promotes whichever trial reaches an empty rung first, so the grid's first values
win. Remedies: ``StratifiedScheduler`` halves separately per stratum (e.g. per
``model.latent_dim``), so each stratum's best trains to the end; ``SyncHalvingScheduler``
(``kind: sha``, in ``cae.schedule.halving``, working ahead in ``cae.schedule.workahead``)
decides a rung only when the whole stratum has reached it, independent of order;
``cae.schedule.grid`` starts grid trials in a seeded shuffled order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from cae.config.spec import stratum_of
from cae.schedule.halving import (
    SPECULATIVE,
    SPECULATIVE_VALUE,
    MetricModeScheduler,
    search_finished,
)
from cae.schedule.workahead import CostBook
from cae.sweep.internals import set_buffered_results

# ---- one scheduler per stratum ----------------------------------------------------------


class _StratumView:
    """The controller as one stratum's scheduler sees it: only that stratum's trials."""

    def __init__(self, controller, trials: list[Trial]):
        self._controller, self._trials = controller, trials

    def get_trials(self) -> list[Trial]:
        return self._trials

    def __getattr__(self, name: str):
        return getattr(self._controller, name)


class StratifiedScheduler(MetricModeScheduler):
    """One scheduler per stratum (``stratum_of(trial.config, stratify)``), made lazily by a
    picklable ``factory``; every callback goes to the trial's stratum's scheduler, so trials
    of different strata are never compared. No stratify keys: a single stratum. The same
    metric/mode here and in ``tune.TuneConfig`` agree (Ray's own schedulers refuse both)."""

    # With work ahead, what runs next (``_rank``): with many trials per worker the sweep is
    # bound by throughput, and plain SHA's order serves it (stratum by stratum, so that
    # strata finish one after the other and their last epochs overlap the others' work);
    # no early promotions there (``promote_early``): every worker is busy anyway, and
    # promoting early would only reorder the work; with few it is bound by its longest chain
    # of epochs: new trials first (a rung waits for every trial of its stratum), then
    # promoted ones, each costliest first over all strata. Last, a trial to train ahead
    # (``WorkAheadScheduler``).
    KINDS = ("pending", "promoted", "ahead")
    TRIALS_PER_WORKER = 6

    def __init__(self, factory: Callable[[], TrialScheduler], stratify: Sequence[str] = (),
                 metric: str | None = None, mode: str | None = None):
        super().__init__(metric, mode)
        self._factory, self._keys, self._spec = factory, list(stratify), {}
        set_buffered_results(self, factory().supports_buffered_results)
        self._strata: dict[tuple, TrialScheduler] = {}
        self._members: dict[tuple, list[Trial]] = {}
        self._stratum: dict[str, tuple] = {}
        self._costs = CostBook()
        self._workers = 0  # the most trials seen running at once (work ahead)
        self._calls = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if not super().set_search_properties(metric, mode):
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
            sub = self._strata[key] = self._factory()
            self._members[key] = []
            if getattr(sub, "work_ahead", False):
                sub.share_costs(self._costs)  # what an epoch costs, learnt once
            sub.set_search_properties(self._metric, self._mode, **self._spec)
        self._members[key] += [] if again else [trial]
        self._call("on_trial_add", tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = self._call("on_trial_result", tune_controller, trial, result)
        sub = self._strata[self._stratum[trial.trial_id]]
        if (decision == TrialScheduler.CONTINUE and getattr(sub, "work_ahead", False)
                and sub.is_ahead(trial) and self._other_work(tune_controller)):
            decision = TrialScheduler.PAUSE  # work ahead only where nothing else can run
        return decision

    def _rank(self, kind: str, index: int, priority: tuple, bound: bool) -> tuple:
        """Where a stratum's candidate of ``kind`` goes (lower first); ``index``: the
        stratum's place in the order strata appeared; ``priority``: (-seconds per epoch,
        creation order) from ``WorkAheadScheduler.candidates``."""
        if kind == "ahead":
            return (math.inf, 0, priority)
        if bound:  # plain SHA's order: stratum by stratum, promoted first, creation order
            return (index, kind != "promoted", priority[1:])
        return (self.KINDS.index(kind), 0, priority)

    def _throughput_bound(self, tune_controller) -> bool:
        """Whether the sweep has many trials per worker (workers: the most trials seen
        running at once, counted now and then: a cluster may grow)."""
        self._calls += 1
        if self._calls < 64 or self._calls % 64 == 0:
            running = sum(t.status == Trial.RUNNING for t in tune_controller.get_trials())
            self._workers = max(self._workers, running)
        return bool(self._workers) and len(self._stratum) > self.TRIALS_PER_WORKER * self._workers

    def _other_work(self, tune_controller) -> bool:
        """Whether some stratum has a promoted or a new trial waiting for a worker."""
        for key, sub in self._strata.items():
            if getattr(sub, "work_ahead", False):
                found = sub.candidates(_StratumView(tune_controller, self._members[key]),
                                       ahead=False)
                if "promoted" in found or "pending" in found:
                    return True
        return False

    def speculation(self, trial_id: str) -> tuple[int, float] | None:
        """See ``WorkAheadScheduler.speculation``."""
        key = self._stratum.get(trial_id)
        sub = self._strata.get(key)
        return sub.speculation(trial_id) if hasattr(sub, "speculation") else None

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._call("on_trial_complete", tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._call("on_trial_error", tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._call("on_trial_remove", tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Every stratum's choice (SHA decides rungs there too), the first in stratum order;
        with ``work_ahead`` (``WorkAheadScheduler.candidates``): by ``KINDS``, the best
        candidate over all strata."""
        chosen, best, bound = None, None, None
        for index, (key, sub) in enumerate(self._strata.items()):
            view = _StratumView(tune_controller, self._members[key])
            if getattr(sub, "work_ahead", False):
                bound = self._throughput_bound(tune_controller) if bound is None else bound
                sub.promote_early(not bound)
                for kind, (priority, trial) in sub.candidates(view).items():
                    rank = self._rank(kind, index, priority, bound)
                    if best is None or rank < best[0]:
                        best = (rank, trial)
            else:
                chosen = chosen or sub.choose_trial_to_run(view)
        if chosen is None and best is not None:
            chosen = best[1]
        blocked = chosen is None and not search_finished(tune_controller)
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


# The key under which a fused pack's result under halving carries how many of the sweep's
# members are in each progress bucket (``cae.schedule.packed.PackScheduler.member_fates``).
MEMBER_FATES = "member_fates"


class SpeculationMarks(Callback):
    """Writes into a result what the scheduler, which runs first, says of it, before Ray
    Tune's loggers and cae's console read it: trained ahead of an undecided rung
    (``work_ahead``), the rung's epoch (``speculative``) and the trial's value there
    (``speculative_rung_value``); from a fused pack under halving, how many members are in
    each progress bucket (``member_fates``)."""

    def __init__(self, scheduler: TrialScheduler):
        self.scheduler = scheduler

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict,
                        **info) -> None:
        mark = getattr(self.scheduler, "speculation", lambda _: None)(trial.trial_id)
        if mark is not None:
            result[SPECULATIVE], result[SPECULATIVE_VALUE] = mark
        fates = getattr(self.scheduler, "member_fates", None)
        if fates is not None:
            result[MEMBER_FATES] = fates()


def speculation_marks(scheduler: TrialScheduler) -> SpeculationMarks:
    """The callback a sweep with ``scheduler`` adds to its run config."""
    return SpeculationMarks(scheduler)

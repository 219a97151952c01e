"""A sweep on a simulated clock: the project's real scheduler and searcher, fake trials.

``simulate`` builds the searcher and the scheduler exactly as a sweep does
(``cae.schedule.create_searcher``, ``cae.sweep.tuner.scheduler``) and plays Ray Tune's
controller
against them (``ray.tune.execution.tune_controller.TuneController``, reduced to what a
scheduler sees): trials are created from the searcher while fewer than ``max_pending`` wait
(``TUNE_MAX_PENDING_TRIALS_PG``), every free worker goes to the trial the scheduler chooses
(else to the oldest pending one), each result goes to ``on_trial_result`` and its decision
is carried out (CONTINUE, PAUSE: the worker is freed and the trial later goes on from its
checkpoint, STOP), ``stop_trial`` and ``pause_trial`` work as Ray's do, a trial that ends by
itself is reported once more and completed, as a function trainable is. A trial's epochs
(validation loss and seconds) come from a ``Work``: a recorded run's, or drawn.

What is simulated is the schedule, not the training: no process, no Ray. Costs a real run
adds around the epochs (a worker's start, a resume, the report, the test evaluation, the
hand-over of a freed worker) are ``Costs``, measured from recorded runs
(``benchmarks/schedtrace.py``).
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from cae.config.spec import SweepSpec, stratum_of
from cae.sweep.tuner import METRIC, MODE


@dataclass(frozen=True)
class Work:
    """What a trial does if nothing stops it: per epoch its validation loss and seconds;
    ``own_end`` is the stop reason of its last epoch (max_epochs or patience)."""

    val_loss: tuple[float, ...]
    seconds: tuple[float, ...]
    own_end: str = "max_epochs"


@dataclass(frozen=True)
class Costs:
    """Seconds a real run spends around the epochs (see ``schedsim.measure_costs``)."""

    boot_s: float = 0.0  # from the sweep's start to its first trial start (Ray starting)
    new_worker_s: float = 0.0  # a trial's first epoch on a fresh worker process
    segment_s: float = 0.0  # a start or resume on a reused worker
    result_s: float = 0.0  # report and checkpoint, every epoch
    final_s: float = 0.0  # the test evaluation after a trial's last epoch
    handover_s: float = 0.0  # from a worker's release to its next trial's start
    tail_s: float = 0.0  # from the last trial's end to the end of the sweep


def config_key(config: dict) -> str:
    """A trial's identity across runs: its config (seeded searchers hand out the same)."""
    return json.dumps(config, sort_keys=True, default=str)


class SimTrial:
    """What Ray Tune's ``Trial`` is to a scheduler: id, config, status, last result."""

    def __init__(self, trial_id: str, config: dict, work: Work):
        self.trial_id, self.config, self.work = trial_id, config, work
        self.status, self.last_result = Trial.PENDING, {}
        self.epoch = 0  # epochs trained and checkpointed
        self.rows: list[dict] = []  # every result reported, as a logger would write it
        self.gen = 0  # bumped when the running segment ends (stale events are dropped)
        self.running_since: float | None = None
        self.final_reported = False

    def __repr__(self) -> str:
        return f"SimTrial({self.trial_id})"


class _Search:
    """What the controller's ``search_alg`` is to a scheduler (Ray's SearchGenerator):
    ``is_finished`` once the searcher has handed out every trial."""

    def __init__(self, searcher: Searcher, total: int):
        self.searcher, self.total, self.count, self.finished = searcher, total, 0, False

    def next_config(self, trial_id: str) -> dict | None:
        if self.finished:
            return None
        config = self.searcher.suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            self.finished = True
            return None
        self.count += 1
        self.finished = self.count >= self.total
        return config

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class Outcome:
    """What a simulated sweep did."""

    wall_s: float
    busy_s: float  # worker-seconds held by trials (starts, epochs, reports)
    wasted_s: float  # of which: epochs that do not count, cut-short epochs
    workers: int
    trial_epochs: int  # epochs trained, counted or not
    starts: int  # trial starts and resumes
    trials: list[SimTrial] = field(default_factory=list)

    @property
    def utilisation(self) -> float:
        return self.busy_s / (self.workers * self.wall_s) if self.wall_s else 0.0


def counted_rows(rows: list[dict]) -> list[dict]:
    """A trial's results that count, one per epoch, by ``cae.results.tables``' own rule (epochs
    trained ahead of a rung the trial then lost there do not)."""
    from cae.results.tables import counted_epochs

    by_epoch: dict[int, dict] = {}
    for r in rows:
        by_epoch[int(r["epoch"])] = r  # reported again: the last one
    return [r for _, r in sorted(counted_epochs(by_epoch).items())]


class SimController:
    """Ray Tune's controller as a scheduler sees it, on a simulated clock (module doc)."""

    def __init__(self, spec: SweepSpec, work_of: Callable[[dict], Work], workers: int,
                 costs: Costs, max_pending: int | None = None):
        from cae.schedule import create_searcher
        from cae.sweep.tuner import param_space, scheduler

        searcher, total = create_searcher(spec, param_space(spec))
        searcher.set_search_properties(METRIC, MODE, {})
        self.search_alg = _Search(searcher, total)
        from cae.config.trial import TrialConfig

        self.max_epochs = TrialConfig.model_validate(spec.trial).max_epochs
        self.scheduler = scheduler(spec, self.max_epochs)
        self.scheduler.set_search_properties(METRIC, MODE)
        from cae.schedule import schedulers

        marks = getattr(schedulers, "speculation_marks", None)
        self.callbacks = [marks(self.scheduler)] if marks else []
        self.work_of, self.workers, self.costs = work_of, workers, costs
        # what cae.sweep.tuner.pending_trials sets for a grid (one CPU per trial)
        self.max_pending = max_pending or max(200, int(workers * 1.1))
        self.trials: list[SimTrial] = []
        self._pending: deque[SimTrial] = deque()  # creation order; stale entries skipped
        self._events: list = []
        self._seq = 0
        self.now = 0.0
        self.free = self.n_pending = 0
        self.fresh_workers = workers  # workers that have not run a trial yet
        self.busy_s = self.wasted_s = 0.0
        self.starts = self.trial_epochs = 0

    # ---- what schedulers call ---------------------------------------------------------

    def get_trials(self) -> list[SimTrial]:
        return self.trials

    def get_live_trials(self) -> list[SimTrial]:
        return [t for t in self.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]

    def stop_trial(self, trial: SimTrial) -> None:
        """As ``TuneController.stop_trial``: a waiting trial is removed, a running one
        completed with its last result."""
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        searcher = self.search_alg.searcher
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.n_pending -= trial.status == Trial.PENDING
            self.scheduler.on_trial_remove(self, trial)
            searcher.on_trial_complete(trial.trial_id)
        else:
            self.scheduler.on_trial_complete(self, trial, dict(trial.last_result))
            searcher.on_trial_complete(trial.trial_id, result=dict(trial.last_result))
        was_running = trial.status == Trial.RUNNING
        trial.status = Trial.TERMINATED
        if was_running:
            self._release(trial, cut_short=True)

    def _mark_trial_to_checkpoint(self, trial: SimTrial) -> None:
        """Ray's controller writes the trial into its next state snapshot: no disk here."""

    def pause_trial(self, trial: SimTrial, should_checkpoint: bool = True) -> None:
        """A running trial goes back to its last checkpoint (the epoch in progress is lost)."""
        if trial.status == Trial.RUNNING:
            trial.status = Trial.PAUSED
            self._release(trial, cut_short=True)

    # ---- the loop -----------------------------------------------------------------------

    def _push(self, when: float, kind: str, trial: SimTrial | None = None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, trial,
                                      trial.gen if trial else 0))

    def _create_trials(self) -> None:
        while self.n_pending < self.max_pending and not self.search_alg.is_finished():
            trial_id = f"{len(self.trials):05d}"
            config = self.search_alg.next_config(trial_id)
            if config is None:
                break
            trial = SimTrial(trial_id, config, self.work_of(config))
            self.trials.append(trial)
            self._pending.append(trial)
            self.n_pending += 1
            self.scheduler.on_trial_add(self, trial)

    def _oldest_pending(self) -> SimTrial | None:
        while self._pending and self._pending[0].status != Trial.PENDING:
            self._pending.popleft()
        return self._pending[0] if self._pending else None

    def _fill(self) -> None:
        while self.free > 0:
            trial = self.scheduler.choose_trial_to_run(self) or self._oldest_pending()
            if trial is None:
                return
            self._start(trial)

    def _start(self, trial: SimTrial) -> None:
        self.free -= 1
        self.starts += 1
        self.n_pending -= trial.status == Trial.PENDING
        trial.status, trial.running_since = Trial.RUNNING, self.now
        if self.fresh_workers > 0:
            self.fresh_workers -= 1
            setup = self.costs.new_worker_s
        else:
            setup = self.costs.segment_s
        if trial.epoch >= len(trial.work.val_loss):  # ended before: reports its end again
            if not trial.work.own_end:
                raise RuntimeError(f"trial {trial.config} resumes past epoch {trial.epoch}, "
                                   "where the recorded run stopped it: the schedules differ")
            self._push(self.now + setup, "final", trial)
        else:
            self._push(self.now + setup + self._epoch_s(trial, trial.epoch + 1), "epoch", trial)

    def _epoch_s(self, trial: SimTrial, epoch: int) -> float:
        s = trial.work.seconds[epoch - 1] + self.costs.result_s
        return s + (self.costs.final_s if epoch == len(trial.work.val_loss) else 0.0)

    def _release(self, trial: SimTrial, cut_short: bool = False) -> None:
        """The trial's worker is free again (after the hand-over)."""
        held = self.now - trial.running_since
        self.busy_s += held
        if cut_short:
            # the epoch in progress is lost: count it as waste
            done = trial.last_result.get("_t", trial.running_since)
            self.wasted_s += self.now - max(done, trial.running_since)
        trial.running_since = None
        trial.gen += 1
        self._push(self.now + self.costs.handover_s, "free")

    def _result(self, trial: SimTrial, again: bool = False) -> None:
        """One result of a running trial, and the scheduler's decision carried out."""
        epoch = trial.epoch if again else trial.epoch + 1
        work = trial.work
        own_end = epoch == len(work.val_loss)
        if not again:
            trial.epoch = epoch
            self.trial_epochs += 1
        best = min(work.val_loss[:epoch])
        since = max(trial.running_since, trial.last_result.get("_t", 0.0))
        result = {"epoch": epoch, "training_iteration": epoch, METRIC: work.val_loss[epoch - 1],
                  "best_val_loss": best, "trial_id": trial.trial_id, "_t": self.now,
                  "time_this_iter_s": self.now - since}
        if own_end and work.own_end:
            result["stop_reason"] = work.own_end
        decision = self.scheduler.on_trial_result(self, trial, dict(result))
        if decision != TrialScheduler.STOP:
            self.search_alg.searcher.on_trial_result(trial.trial_id, dict(result))
        for cb in self.callbacks:
            cb.on_trial_result(iteration=0, trials=self.trials, trial=trial, result=result)
        trial.last_result = result
        trial.rows.append(result)
        if trial.status != Trial.RUNNING:  # stopped by the scheduler while deciding
            return
        if own_end and not work.own_end and decision == TrialScheduler.CONTINUE:
            raise RuntimeError(f"trial {trial.config} goes on past epoch {epoch}, where the "
                               "recorded run stopped it: the schedules differ")
        if decision == TrialScheduler.STOP or (own_end and decision == TrialScheduler.CONTINUE):
            self.stop_trial(trial)
        elif decision == TrialScheduler.PAUSE:
            trial.status = Trial.PAUSED
            self._release(trial)
        else:
            self._push(self.now + self._epoch_s(trial, epoch + 1), "epoch", trial)

    def run(self) -> Outcome:
        self.now = self.costs.boot_s
        self.free = self.workers
        self._create_trials()
        # Ray's first step: the scheduler's choice, then pending trials in creation order
        first = self.scheduler.choose_trial_to_run(self)
        if first is not None:
            self._start(first)
        while self.free > 0 and (t := self._oldest_pending()) is not None:
            self._start(t)
        self._fill()
        end = self.now
        while self._events:
            when, _, kind, trial, gen = heapq.heappop(self._events)
            if trial is not None and gen != trial.gen:
                continue  # the segment it belonged to was cut short
            self.now = when
            if kind == "free":
                self.free += 1
            elif kind == "epoch":
                self._result(trial)
            elif kind == "final":
                self._result(trial, again=True)
            end = max(end, when if kind != "free" else when - self.costs.handover_s)
            self._create_trials()
            self._fill()
        unfinished = [t for t in self.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        if unfinished or not self.search_alg.is_finished():
            raise RuntimeError(f"the simulated sweep stalled with {len(unfinished)} trials "
                               f"unfinished: {unfinished[:5]}")
        wasted = self.wasted_s
        for t in self.trials:
            counted = {int(r["epoch"]) for r in counted_rows(t.rows)}
            for e in {int(r["epoch"]) for r in t.rows} - counted:
                wasted += t.work.seconds[e - 1] + self.costs.result_s
        return Outcome(end + self.costs.tail_s, self.busy_s, wasted, self.workers,
                       self.trial_epochs, self.starts, self.trials)


def simulate(spec: SweepSpec, work_of: Callable[[dict], Work], workers: int,
             costs: Costs = Costs(), max_pending: int | None = None) -> Outcome:
    """One sweep of ``spec`` on ``workers`` simulated workers (one trial each)."""
    return SimController(spec, work_of, workers, costs, max_pending).run()


def answers(outcome: Outcome, stratify: list[str]) -> dict[str, tuple[str, float]]:
    """Each stratum's winner (config key) and best validation loss, from the counted
    epochs of every trial."""
    best: dict[str, tuple[str, float]] = {}
    for t in outcome.trials:
        rows = counted_rows(t.rows)
        if not rows:
            continue
        value = min(r[METRIC] for r in rows)
        label = json.dumps(stratum_of(t.config, stratify), default=str)
        key = config_key(t.config)
        if label not in best or (value, key) < (best[label][1], best[label][0]):
            best[label] = (key, value)
    return dict(sorted(best.items()))


def stopped_at(outcome: Outcome) -> dict[str, int]:
    """Each trial's epochs trained, by config key: the decisions the schedule took."""
    return {config_key(t.config): t.epoch for t in outcome.trials}

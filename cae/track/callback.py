"""The live side of tracking: a Ray Tune callback on the driver that hands every trial's
results to the sweep's trackers (``cae.track.send.SweepTracking``) as they arrive.

It runs where Tune runs its loop, so trials on other nodes need no route to a tracker, and
it only collects: each result is noted as it arrives and handed over at the end of Tune's
step (by then every callback has seen it, the scheduler's marks on an epoch trained ahead
included); the rows are made and sent on the feeds' threads (``cae.track.live``), so a
tracker that is slow or down costs the sweep nothing.
"""

from __future__ import annotations

from ray import tune
from ray.tune.experiment import Trial

from cae.run.packfiles import PACK_KEY
from cae.track.live import LiveRows, Seen
from cae.track.send import SweepTracking


class TrackingCallback(tune.Callback):
    """Feeds ``tracking`` with what Tune reports of each trial (see the module docstring)."""

    def __init__(self, tracking: SweepTracking):
        self.tracking = tracking
        self.rows = LiveRows(tracking.run_dir, tracking.spec)
        self._noted: dict[str, tuple[Trial, list[dict]]] = {}

    def __getstate__(self) -> dict:  # Tune pickles its run config (tuner.pkl): no threads
        return {"tracking": None, "rows": None, "_noted": {}}

    def _note(self, trial: Trial, result: dict | None = None) -> None:
        _, results = self._noted.setdefault(trial.trial_id, (trial, []))
        if result is not None:
            results.append(result)  # copied when handed over, once every callback has run

    def _hand_over(self) -> None:
        if not self._noted or self.tracking is None:
            self._noted = {}
            return
        seen = [Seen(trial.trial_id, str(trial.path or "").rstrip("/").rsplit("/", 1)[-1],
                     trial.status, trial.num_failures, [dict(r) for r in results],
                     dict(trial.last_result or {}), PACK_KEY in trial.config)
                for trial, results in self._noted.values()]
        self._noted = {}
        rows = self.rows
        self.tracking.put(lambda: rows.runs(seen))

    # ---- Ray Tune's hooks ---------------------------------------------------------------

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info) -> None:
        self._note(trial, result)

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        self._hand_over()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info) -> None:
        self._note(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info) -> None:
        self._note(trial)

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self._hand_over()

"""MLflow as a tracker: a run per trial under a parent run for the sweep, through
``MlflowClient`` (a server or a database URI), metrics in batches (``log_batch``).

Runs are found again by their tags, not by memory: every run of a sweep carries ``cae.run``
(the run directory's name), a trial's also ``cae.trial_id``, the sweep's ``cae.kind:
sweep``; so ``cae resume`` and ``cae track`` go on with the runs an earlier driver made.
What a run holds is read once (its params, tags, latest metrics, and the steps of its
``epoch`` metric) and only what is missing or changed is sent: an epoch's metrics go in
the same ``log_batch`` as its ``epoch`` step, which MLflow's SQL stores write in one
transaction, so an epoch is there whole or not at all, and never twice.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from cae.track.runs import (
    FAILED,
    FINISHED,
    KIND_TAG,
    RUN_TAG,
    RUNNING,
    STOPPED,
    TRIAL_ID_TAG,
    SweepRun,
    TrialRun,
)

STEP_KEY = "epoch"  # logged at every step with the epoch's metrics: the steps a run holds
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a trial under its sweep
STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", RUNNING: "RUNNING", STOPPED: "KILLED"}
# log_batch's limits (MLflow's REST API): per request, and a param value's length
MAX_METRICS, MAX_PARAMS_OR_TAGS, MAX_VALUE = 1000, 100, 6000


@dataclass
class Held:
    """What the tracker holds of one run, as last read or sent."""

    run_id: str
    params: set[str]
    tags: dict[str, str]
    metrics: dict[str, float]  # latest values
    status: str
    steps: set[int] | None = None  # read when first needed


def _same(a: float | None, b: float) -> bool:
    return a is not None and (a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))


class MlflowTracker:
    """The runs of one sweep (``run`` is its run directory's name) in ``experiment`` of
    the MLflow at ``uri``."""

    kind = "MLflow"

    def __init__(self, uri: str, experiment: str, run: str):
        self.uri, self.experiment, self.run = uri, experiment, run
        # set_terminated prints two lines of links per run to stdout unless told not to
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.label = f"MLflow at {uri}"
        self._client = None
        self._experiment_id: str | None = None
        self._held: dict[str, Held] | None = None  # trial id -> run; None: not read yet
        self._parent: Held | None = None

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What a tracker that is down, slow or refusing raises (anything else is a bug)."""
        import requests
        from mlflow.exceptions import MlflowException

        return (MlflowException, requests.RequestException, OSError)

    def forget(self) -> None:
        """After a failed request: read what the tracker holds again before sending more
        (a request that timed out may have been written all the same)."""
        self._held, self._parent = None, None

    # ---- finding the runs ----------------------------------------------------------------

    def _connect(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        if self._experiment_id is None:
            self._experiment_id = self._experiment()
        if self._held is None:
            self._read_runs()
        return self._client

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(self.experiment)
        except MlflowException:  # made by another driver meanwhile
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _read_runs(self) -> None:
        from mlflow.entities import ViewType

        held, parent, token = {}, None, None
        quoted = self.run.replace("'", "\\'")
        while True:
            page = self._client.search_runs(
                [self._experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{quoted}'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            for r in page:
                tags = dict(r.data.tags)
                known = Held(r.info.run_id, set(r.data.params), tags, dict(r.data.metrics),
                             r.info.status)
                if tags.get(KIND_TAG) == "sweep":
                    parent = parent or known
                elif TRIAL_ID_TAG in tags:
                    held.setdefault(tags[TRIAL_ID_TAG], known)
            token = page.token
            if not token:
                break
        self._held, self._parent = held, parent

    def _parent_run(self) -> Held:
        if self._parent is None:
            tags = {RUN_TAG: self.run, KIND_TAG: "sweep"}
            made = self._client.create_run(self._experiment_id, tags=tags, run_name=self.run)
            self._parent = Held(made.info.run_id, set(), tags, {}, "RUNNING")
        return self._parent

    # ---- sending -------------------------------------------------------------------------

    def trial(self, run: TrialRun) -> None:
        """Make the tracker hold ``run``: the run made if it has none, then what it lacks."""
        client = self._connect()
        held = self._held.get(run.trial_id)
        if held is None:
            tags = {RUN_TAG: self.run, TRIAL_ID_TAG: run.trial_id,
                    PARENT_TAG: self._parent_run().run_id}
            made = client.create_run(self._experiment_id, tags=tags, run_name=run.name)
            held = self._held[run.trial_id] = Held(made.info.run_id, set(), tags, {},
                                                   "RUNNING", steps=set())
        if held.steps is None:
            held.steps = {int(m.step) for m in client.get_metric_history(held.run_id, STEP_KEY)}
        now = int(time.time() * 1000)
        self._send_steps(held, run, now)
        summary = {k: v for k, v in run.summary.items() if not _same(held.metrics.get(k), v)}
        self._send(held, metrics=[(k, v, run.last_step) for k, v in summary.items()],
                   params=run.params, tags=run.tags, now=now)
        self._set_status(held, STATUS[run.state])

    def _send_steps(self, held: Held, run: TrialRun, now: int) -> None:
        """The epochs the run lacks, whole epochs per request, each with its step mark."""
        from mlflow.entities import Metric

        batch: list = []
        for step in sorted(s for s in run.steps if s not in held.steps):
            values = {**run.steps[step], STEP_KEY: float(step)}
            if batch and len(batch) + len(values) > MAX_METRICS:
                self._client.log_batch(held.run_id, metrics=batch)
                held.steps |= {int(m.step) for m in batch}
                batch = []
            batch += [Metric(k, v, now, step) for k, v in values.items()]
            held.metrics.update(values)
        if batch:
            self._client.log_batch(held.run_id, metrics=batch)
            held.steps |= {int(m.step) for m in batch}

    def _send(self, held: Held, metrics: list[tuple[str, float, int]], params: dict[str, str],
              tags: dict[str, str], now: int) -> None:
        """Metrics, the params the run lacks and the tags that changed, in as few batches
        as log_batch allows (a param, once logged, cannot change in MLflow)."""
        from mlflow.entities import Metric, Param, RunTag

        new_params = [Param(k, v[:MAX_VALUE]) for k, v in params.items()
                      if k not in held.params]
        new_tags = [RunTag(k, v[:MAX_VALUE]) for k, v in tags.items() if held.tags.get(k) != v]
        new_metrics = [Metric(k, v, now, step) for k, v, step in metrics]
        while new_params or new_tags or new_metrics:
            p, new_params = new_params[:MAX_PARAMS_OR_TAGS], new_params[MAX_PARAMS_OR_TAGS:]
            t, new_tags = new_tags[:MAX_PARAMS_OR_TAGS], new_tags[MAX_PARAMS_OR_TAGS:]
            room = MAX_METRICS - len(p) - len(t)
            m, new_metrics = new_metrics[:room], new_metrics[room:]
            self._client.log_batch(held.run_id, metrics=m, params=p, tags=t)
            held.params |= {x.key for x in p}
            held.tags.update({x.key: x.value for x in t})
            held.metrics.update({x.key: x.value for x in m})

    def _set_status(self, held: Held, status: str) -> None:
        if held.status == status:
            return
        if status == "RUNNING":
            self._client.update_run(held.run_id, status=status)
        else:
            self._client.set_terminated(held.run_id, status=status)
        held.status = status

    def sweep(self, run: SweepRun) -> None:
        """The sweep's parent run: its params, metrics, files and state."""
        self._connect()
        held = self._parent_run()
        metrics = [(k, v, 0) for k, v in run.summary.items() if not _same(held.metrics.get(k), v)]
        self._send(held, metrics, run.params, run.tags, int(time.time() * 1000))
        for path in run.files:
            self._client.log_artifact(held.run_id, str(path))  # a file sent again replaces it
        self._set_status(held, STATUS[run.state])

    def close(self) -> None:
        """Nothing is left open: every request has been answered."""

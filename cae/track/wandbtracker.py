"""Weights & Biases as a tracker: a run per trial, grouped by the sweep, plus a run of the
sweep itself (its spec as config, the tables and report as files).

``offline`` needs no account and no network: each run is written under the run directory's
``wandb/`` (``offline-run-*``), and ``wandb sync`` run there uploads them later, from a
machine that has the network; nothing waits for an upload. Each trial's run has an id made
from the sweep's and the trial's, so a run written again (a resume, ``cae track``) is the
same run to W&B: ``wandb sync`` takes a second offline folder of one id as a resumed run.

W&B holds no step twice, and offline there is no server to ask what it holds: a ledger
beside the runs (``wandb/cae-sent.json``) says what has been written for each trial (its
last step, end values and state), and only what is new is written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cae.run.directory import write_file
from cae.track.runs import FAILED, RUNNING, SweepRun, TrialRun

LEDGER = "cae-sent.json"
SWEEP_KEY = ""  # the sweep's own run in the ledger


def _value(text: str) -> Any:
    """A param's text back as the value it was (numbers, lists, None) for W&B's config,
    where numbers can be plotted against each other."""
    if text == "None":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


class WandbTracker:
    """The runs of one sweep (``run``: its run directory's name, at ``root`` on this
    machine) in a W&B ``project``."""

    kind = "W&B"

    def __init__(self, project: str, entity: str | None, mode: str, group: str, run: str,
                 root: Path):
        self.project, self.entity, self.mode, self.group, self.run = (project, entity, mode,
                                                                       group, run)
        self.root = Path(root)
        self.label = f"W&B project {project} ({mode})"
        self._open: dict[str, Any] = {}  # key -> an open wandb run
        self._ledger: dict[str, dict] | None = None
        self._ready = False
        if mode == "offline":  # no error reports to W&B's servers either
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        import wandb

        return (wandb.Error, OSError)

    def forget(self) -> None:
        """After a failure: the ledger is read again from its file (what was written)."""
        self._ledger = None

    @property
    def folder(self) -> Path:
        return self.root / "wandb"

    def _ledger_now(self) -> dict[str, dict]:
        if self._ledger is None:
            try:
                self._ledger = json.loads((self.folder / LEDGER).read_text())
            except (OSError, ValueError):
                self._ledger = {}
        return self._ledger

    def _save_ledger(self) -> None:
        write_file(self.folder, LEDGER, json.dumps(self._ledger, sort_keys=True).encode())

    def _run_id(self, key: str) -> str:
        """The same id for the same trial of the same sweep, wherever it is sent from."""
        digest = hashlib.sha1(f"{self.run}/{key}".encode()).hexdigest()[:8]
        return f"{key or 'sweep'}-{digest}"

    def _init(self, key: str, name: str, config: dict, job_type: str):
        import wandb

        if not self._ready:
            # online: a login that is missing is an error here, never a prompt (the
            # feed runs in the background of a sweep)
            if self.mode == "online" and not wandb.login(prompt=False, verify=False):
                raise wandb.Error("W&B online mode needs a login (`wandb login` or "
                                  "WANDB_API_KEY); or set tracking.wandb.mode: offline")
            self.folder.mkdir(parents=True, exist_ok=True)
            self._ready = True
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                  x_disable_meta=True, x_disable_machine_info=True,
                                  save_code=False, disable_git=True, x_save_requirements=False)
        run = wandb.init(project=self.project, entity=self.entity, group=self.group,
                         name=name, id=self._run_id(key), job_type=job_type, config=config,
                         dir=str(self.root), mode=self.mode, resume="allow",
                         reinit="create_new", settings=settings)
        self._open[key] = run
        return run

    def trial(self, run: TrialRun) -> None:
        """Write what the ledger says ``run``'s W&B run lacks: new epochs (in order: W&B
        steps only go up), changed end values, the end."""
        ledger = self._ledger_now()
        sent = ledger.get(run.trial_id, {})
        new = sorted(s for s in run.steps if s > sent.get("step", 0))
        ends = {**run.summary, **run.tags}
        if not new and ends == sent.get("summary") and run.state == sent.get("state"):
            return
        wb = self._open.get(run.trial_id) or self._init(
            run.trial_id, run.name, {k: _value(v) for k, v in run.params.items()}, "trial")
        for step in new:
            wb.log({**run.steps[step], "epoch": step}, step=step)
        wb.summary.update(ends)
        ledger[run.trial_id] = {"step": max([sent.get("step", 0), *new]), "summary": ends,
                                "state": run.state}
        if run.state != RUNNING:
            self._finish(run.trial_id, failed=run.state == FAILED)
        self._save_ledger()

    def sweep(self, run: SweepRun) -> None:
        """The sweep's own run: the spec's settings as config, the tables and report as
        files; finished once the sweep is."""
        ledger = self._ledger_now()
        sent = ledger.get(SWEEP_KEY, {})
        files = sorted(str(f) for f in run.files)
        if (run.summary == sent.get("summary") and run.state == sent.get("state")
                and files == sent.get("files")):
            return
        wb = self._open.get(SWEEP_KEY) or self._init(
            SWEEP_KEY, run.name, {k: _value(v) for k, v in run.params.items()}, "sweep")
        wb.summary.update(run.summary)
        for path in run.files:  # a run's folder is what W&B uploads as its files
            shutil.copyfile(path, Path(wb.dir) / Path(path).name)
        ledger[SWEEP_KEY] = {"summary": run.summary, "state": run.state, "files": files}
        if run.state != RUNNING:
            self._finish(SWEEP_KEY, failed=False)
        self._save_ledger()

    def _finish(self, key: str, failed: bool) -> None:
        wb = self._open.pop(key, None)
        if wb is not None:
            wb.finish(exit_code=1 if failed else 0)

    def close(self) -> None:
        """Every run still open written to its end (offline: to disk, nothing uploaded)."""
        for key in list(self._open):
            self._finish(key, failed=False)

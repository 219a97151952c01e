"""Weights & Biases as a tracker: a run per trial, grouped by the sweep, plus a run of the
sweep itself (its spec as config, the tables and report as files).

``offline`` needs no account and no network: each run is written under the run directory's
``wandb/`` (``offline-run-*``), and ``wandb sync`` run there uploads them later, from a
machine that has the network; nothing waits for an upload. Each trial's run has an id made
from the sweep's and the trial's, so a run written again (a resume, ``cae track``) is the
same run to W&B: ``wandb sync`` takes a second offline folder of one id as a resumed run.

W&B holds no step twice, and offline there is no server to ask what it holds; so what a run
holds is read from W&B's own files (``cae.track.wandbfiles``): the history steps, summary,
end and saved files of every folder of its id, read when the tracker first sends (and again
after a failure). Only what they lack is written: the epochs after the highest step they
hold, in order and without a gap (W&B's steps only go up), end values that differ, the end
of a run that has ended.

Why a kill at any moment loses no epoch and writes none twice:

- W&B's service keeps a run's newest records in memory until a block of its file is full,
  its flush interval has passed (``x_transaction_log_flush_interval``) or the run is
  finished; a driver killed with its service (a crash, SIGKILL) leaves files that end
  early, in the middle of a record at worst. A driver's own service stops without writing
  moments after it sees its driver gone.
- Nothing of cae's says more than those files: an epoch counts as written only once it is
  whole in a file (one history record with its checksum). What the service lost is missing
  from the files, and the next driver (``cae resume``) or ``cae track`` writes it again, in
  a new folder of the same run; what the files hold is never written again.
- In between, a tracker counts the epochs its own open runs have taken (their service is
  alive and writes them); a run it finishes counts as finished once its file ends with the
  run's exit record (the service writes it last, a moment after ``finish`` returns). After
  a failure it finishes its open runs (their service writes what it holds, or has lost it)
  and reads the files again.

A service shared through ``WANDB_SERVICE`` (``wandb beta core start``) outlives a killed
driver and holds its runs: end it before ``cae resume``.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cae.track.runs import FAILED, RUNNING, SweepRun, TrialRun
from cae.track.wandbfiles import Held, RunFile, ends_its_run, read_runs

SWEEP_KEY = ""  # the sweep's own run
# W&B's service writes a finished run's last records a moment after ``finish`` returns: the
# longest wait for them (a service that takes longer is a tracker that failed)
WRITTEN_WAIT_S = 60.0


def _value(text: str) -> Any:
    """A param's text back as the value it was (numbers, lists, None) for W&B's config,
    where numbers can be plotted against each other."""
    if text == "None":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _lacks(held: Held, summary: dict[str, Any], state: str) -> bool:
    """Whether a run's end values or its end are not yet what W&B holds: a value it lacks
    or holds otherwise, or a run that has ended (failed: exit code 1) whose newest folder
    did not end so. A run that goes on (a resumed trial) is opened again only with
    something new."""
    missing = object()
    if any(held.summary.get(k, missing) != v for k, v in summary.items()):
        return True
    return state != RUNNING and held.exit_code != _exit_code(state)


def _next_steps(top: int, steps: Iterable[int]) -> list[int]:
    """The epochs to write after ``top``, the highest W&B holds: those that follow it one by
    one. An epoch after one that is missing waits for it (W&B's steps only go up, so the
    missing one could not follow): a resumed trial's new epochs, while the epochs its killed
    driver's W&B service lost are missing, wait for the tables' rows at the end of the sweep
    (or ``cae track``), which bring them all."""
    out: list[int] = []
    for step in sorted(s for s in steps if s > top):
        if step != (out[-1] if out else top) + 1:
            break
        out.append(step)
    return out


def _exit_code(state: str) -> int:
    return 1 if state == FAILED else 0


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
        self._held: dict[str, Held] | None = None  # run id -> what W&B holds; None: unread
        self._ready = False
        if mode == "offline":  # no error reports to W&B's servers either
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        import wandb

        return (wandb.Error, OSError)

    def forget(self) -> None:
        """After a failure: the runs still open are finished (W&B's service writes what it
        holds of them, or has lost it with its process), and what W&B holds is read from
        its files again before anything more is written."""
        for key in list(self._open):
            try:
                self._finish(key, 0)
            except self.errors:  # its service is gone: its files say what it wrote
                pass
        self._held = None

    @property
    def folder(self) -> Path:
        return self.root / "wandb"

    def _held_for(self, key: str) -> Held:
        """What W&B holds of ``key``'s run: its files as they were when first needed (no
        run of this tracker was open then), and what this tracker has written since."""
        if self._held is None:
            self._held = read_runs(self.folder)
        run_id = self._run_id(key)
        return self._held.setdefault(run_id, Held(run_id))

    def _run_id(self, key: str) -> str:
        """The same id for the same trial of the same sweep, wherever it is sent from."""
        digest = hashlib.sha1(f"{self.run}/{key}".encode()).hexdigest()[:8]
        return f"{key or 'sweep'}-{digest}"

    def _start(self):
        import wandb

        if not self._ready:
            # online: a login that is missing is an error here, never a prompt (the
            # feed runs in the background of a sweep)
            if self.mode == "online" and not wandb.login(prompt=False, verify=False):
                raise wandb.Error("W&B online mode needs a login (`wandb login` or "
                                  "WANDB_API_KEY); or set tracking.wandb.mode: offline")
            self.folder.mkdir(parents=True, exist_ok=True)
            self._ready = True
        return wandb

    def _run(self, key: str, name: str, params: dict[str, str], job_type: str):
        """``key``'s open run: the one this tracker holds, or a new folder of its id."""
        if key in self._open:
            return self._open[key]
        wandb = self._start()
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                  x_disable_meta=True, x_disable_machine_info=True,
                                  save_code=False, disable_git=True, x_save_requirements=False)
        run = wandb.init(project=self.project, entity=self.entity, group=self.group,
                         name=name, id=self._run_id(key), job_type=job_type,
                         config={k: _value(v) for k, v in params.items()},
                         dir=str(self.root), mode=self.mode, resume="allow",
                         reinit="create_new", settings=settings)
        self._open[key] = run
        held = self._held_for(key)
        held.files.append(RunFile(Path(run.settings.sync_file)))
        return run

    def trial(self, run: TrialRun) -> None:
        """Write what W&B lacks of ``run``'s W&B run: new epochs (in order, each after the
        one before it: W&B's steps only go up), changed end values, the end."""
        held = self._held_for(run.trial_id)
        new = _next_steps(max(held.steps, default=0), run.steps)
        ends = {**run.summary, **run.tags}
        if not new and not _lacks(held, ends, run.state):
            return
        wb = self._run(run.trial_id, run.name, run.params, "trial")
        written = held.files[-1]
        for step in new:
            wb.log({**run.steps[step], "epoch": step}, step=step)
            written.rows.append((step, run.steps[step]))
        wb.summary.update(ends)
        written.summary.update(ends)
        if run.state != RUNNING:
            self._finish(run.trial_id, _exit_code(run.state))

    def sweep(self, run: SweepRun) -> None:
        """The sweep's own run: the spec's settings as config, the tables and report as
        files; finished once the sweep is."""
        held = self._held_for(SWEEP_KEY)
        unsaved = [Path(p) for p in run.files if not self._saved(SWEEP_KEY, held, Path(p))]
        if not unsaved and not _lacks(held, run.summary, run.state):
            return
        wb = self._run(SWEEP_KEY, run.name, run.params, "sweep")
        wb.summary.update(run.summary)
        held.files[-1].summary.update(run.summary)
        for path in unsaved:  # a run's folder is what W&B uploads as its files
            shutil.copyfile(path, Path(wb.dir) / path.name)
        if run.state != RUNNING:
            self._finish(SWEEP_KEY, 0)

    def _saved(self, key: str, held: Held, path: Path) -> bool:
        """Whether W&B holds ``path`` as it is now: its newest copy among the files of the
        run's folders that ended (``wandb sync`` uploads them) or of its open one."""
        for written in reversed(held.files):
            ended = written.exit_code is not None or (
                key in self._open and written is held.files[-1])
            copy = written.folder / "files" / path.name
            if ended and copy.is_file():
                return filecmp.cmp(copy, path, shallow=False)
        return False

    def _finish(self, key: str, exit_code: int) -> None:
        """``key``'s open run finished, and its file written to its end."""
        wb = self._open.pop(key, None)
        if wb is None:
            return
        wb.finish(exit_code=exit_code)
        written = self._held_for(key).files[-1]
        written.exit_code = exit_code
        deadline = time.monotonic() + WRITTEN_WAIT_S
        while not ends_its_run(written.path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"W&B's service has not written {written.path} to its "
                                   f"end {WRITTEN_WAIT_S:.0f} s after the run finished")
            time.sleep(0.02)

    def close(self) -> None:
        """Every run still open written to its end (offline: to disk, nothing uploaded)."""
        for key in list(self._open):
            self._finish(key, 0)

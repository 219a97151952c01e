"""The console of a sweep: one live progress bar fed by a Ray Tune callback.

``ProgressCallback`` runs on the driver. On a terminal it keeps one tqdm bar up to date:
trials done / running / paused / pending / errored, trial-epochs done against the dry run's
maximum, elapsed time, an estimate of the time left (from the trial-epochs expected with
early stopping, ``cae.results.status.planned_trial_epochs``, at the rate so far) and the best
validation loss with its configuration. When the output is not a terminal (CI, logs, ``ray
job logs``) it prints the same as a plain line every ``interval`` seconds instead. Every
trial error is one line (a retried failure too). It also drives the live report
(``cae.sweep.livereport``). Ray Tune's own per-trial output is off unless ``--verbose``
(``cae.sweep.tuner.run_config``).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import IO

from ray import tune
from ray.tune.experiment import Trial

from cae.config.spec import SweepSpec
from cae.results.status import Progress, rate
from cae.run.outcomes import BUCKETS, bucket
from cae.run.packfiles import PACK_KEY
from cae.run.state import point_key
from cae.schedule.packed import MEMBERS
from cae.schedule.schedulers import MEMBER_FATES
from cae.sweep.livereport import LiveReport
from cae.sweep.plan import Checked

PLAIN_EVERY_S = 30.0  # a plain line this often when the output is not a terminal
BAR_EVERY_S = 1.0  # the bar is redrawn at most this often


def _error_line(trial: Trial) -> str:
    """The last line of a trial's error file (the exception), else a generic reason."""
    path = trial.error_file
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, TypeError):
        lines = []
    return lines[-1] if lines else "see its error.txt"


class ProgressCallback(tune.Callback):
    """The progress bar (or plain lines) and one line per trial error; see the module
    docstring. ``total``, ``max_epochs`` and ``planned`` come from the dry run
    (``cae.sweep.plan.check_spec``); ``axes`` are the swept keys shown with the best trial."""

    def __init__(self, name: str, total: int, max_epochs: int, planned: int,
                 axes: list[str], stream: IO[str] | None = None, tty: bool | None = None,
                 interval: float = PLAIN_EVERY_S, live: LiveReport | None = None,
                 final_report: bool = False, carried: dict[str, int] | None = None):
        self.name, self.axes = name, list(axes)
        self.carried = dict(carried or {})  # cae extend: point key -> epochs taken over
        self.total, self.max_epochs, self.planned = total, max_epochs, planned
        self.interval, self.live, self.final_report = interval, live, final_report
        self._stream, self._tty = stream, tty
        self._bar = None
        self._start = self._last = 0.0
        self._epochs_at_start: int | None = None
        # a fused sweep under halving: members by bucket, as the scheduler last said
        # (``cae.schedule.schedulers.MEMBER_FATES``); its packs overlap in members
        self._fates: dict[str, int] = {}
        self.lines = 0  # plain lines printed (for tests)

    def __getstate__(self) -> dict:  # Tune pickles its run config (tuner.pkl): no streams
        state = {k: v for k, v in self.__dict__.items() if k not in ("_stream", "_bar")}
        return {**state, "_stream": None, "_bar": None}

    @property
    def stream(self) -> IO[str]:
        return self._stream or sys.stdout

    @property
    def tty(self) -> bool:
        if self._tty is None:
            isatty = getattr(self.stream, "isatty", None)
            self._tty = bool(isatty and isatty())
        return self._tty

    # ---- what is shown ----------------------------------------------------------------

    def progress(self, trials: list[Trial], now: float) -> Progress:
        p = Progress(self.total, self.max_epochs, self.planned)
        counts = dict.fromkeys(BUCKETS, 0)
        best, best_trial, created = math.inf, None, 0
        for trial in trials:
            last = trial.last_result or {}
            # a fused pack (cae.sweep.trainable) is one Tune trial for several of the sweep's
            # trials: each member counts as one, those it has stopped already as done
            members = len(trial.config.get(PACK_KEY) or ()) or 1
            created += members
            kind = bucket(trial.status, str(last.get("stop_reason", "")))
            stopped = int(last.get("members_stopped", 0)) if kind in ("running", "paused") else 0
            counts["done"] += stopped
            counts[kind] += members - stopped
            epochs = int(last.get("member_epochs", last.get("epoch", 0)) or 0)
            if epochs and self.carried:  # count what this run trained, not its sources
                epochs = max(0, epochs - self.carried.get(point_key(trial.config), 0))
            p.epochs += epochs
            value = last.get("best_val_loss")
            if isinstance(value, (int, float)) and math.isfinite(value) and value < best:
                best, best_trial = value, trial
        counts["pending"] += max(0, self.total - created)  # not created by the search yet
        p.counts = dict(self._fates) if self._fates else counts
        if best_trial is not None:
            p.best = best
            p.best_config = {} if PACK_KEY in best_trial.config else dict(best_trial.config)
        if self._epochs_at_start is None:
            self._epochs_at_start = p.epochs  # a resumed sweep: the rate is this session's
        p.elapsed = now - self._start
        p.rate = rate(p.epochs, self._epochs_at_start, p.elapsed)
        return p

    def say(self, text: str) -> None:
        """A line of its own, above the bar if there is one."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _draw(self, p: Progress, final: bool = False) -> None:
        if not self.tty:
            print(f"{self.name}: {p.line(self.axes)}", file=self.stream, flush=True)
            self.lines += 1
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.max_epochs, file=self.stream,
                             bar_format="|{bar:16}| {n_fmt}/{total_fmt} trial-epochs{postfix}",
                             leave=True, mininterval=0)
        # the line is cut to the terminal's width (one line, redrawn in place); a terminal
        # that reports no width (0 columns) gets 100
        self._bar.ncols = shutil.get_terminal_size((100, 24)).columns
        self._bar.set_postfix_str(f"{p.counts_text()}; {p.time_text()}; "
                                  f"{p.best_text(self.axes, short=True)}", refresh=False)
        self._bar.n = min(p.epochs, self.max_epochs)
        self._bar.refresh()
        if final:
            self._bar.close()
            self._bar = None

    # ---- Ray Tune's hooks ---------------------------------------------------------------

    def setup(self, **info) -> None:
        self._start = time.monotonic()
        self._last = -math.inf
        if self.live is not None:
            self.live.say = self.say

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        now = time.monotonic()
        if now - self._last >= (BAR_EVERY_S if self.tty else self.interval):
            self._last = now
            self._draw(self.progress(trials, now))
        if self.live is not None:
            self.live.tick(now)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info) -> None:
        if isinstance(result.get(MEMBER_FATES), dict):
            self._fates = {kind: int(result[MEMBER_FATES].get(kind, 0)) for kind in BUCKETS}
        if result.get("error"):  # a trial that diverged ends without failing
            self.say(f"trial {trial.trial_id} errored ({self._where(trial, result)}): "
                     f"{result['error']}")
        for member, metrics in (result.get(MEMBERS) or {}).items():
            if isinstance(metrics, dict) and metrics.get("error"):
                self.say(f"trial {metrics.get('trial', member)} of pack {trial.trial_id} "
                         f"errored (epoch {metrics.get('epoch')}): {metrics['error']}")
        if result.get("resumed_from"):  # a checkpoint skipped or a trial taken over
            self.say(f"trial {trial.trial_id} goes on from {result['resumed_from']} "
                      f"({self._where(trial)})")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info) -> None:
        self.say(f"trial {trial.trial_id} errored "
                  f"({self._where(trial)}): {_error_line(trial)}")

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial,
                         **info) -> None:
        self.say(f"trial {trial.trial_id} failed and is retried from its last checkpoint "
                  f"({self._where(trial)}): {_error_line(trial)}")

    def _where(self, trial: Trial, result: dict | None = None) -> str:
        """The trial's swept settings and its epoch (of ``result``, else its last)."""
        from cae.results.status import config_text

        epoch = (result or trial.last_result or {}).get("epoch")
        at = f"epoch {epoch}" if epoch else "before its first epoch"
        config = config_text(dict(trial.config), self.axes)
        return f"{config}; {at}" if config else at

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self._draw(self.progress(trials, time.monotonic()), final=True)
        if self.live is not None:
            self.live.finish(rewrite=self.final_report)


def for_run(spec: SweepSpec, checked: Checked, run_dir: str, report_every: float = 300,
            final_report: bool = False, verbose: bool = False) -> ProgressCallback:
    """The callback of ``cae sweep`` / ``cae resume`` for a checked spec: the bar (plain
    lines under ``verbose``, beside Ray's own output), and the live report of ``run_dir``
    every ``report_every`` seconds (0: none), once more at the end if ``final_report``."""
    from cae.results.status import work
    from cae.sweep.extension import read_extension

    extension = read_extension(run_dir)
    most, planned = work(spec, checked, extension)
    live = LiveReport(run_dir, report_every) if report_every > 0 else None
    return ProgressCallback(spec.name, checked.n_trials, most, planned, spec.swept(),
                            tty=False if verbose else None, live=live,
                            final_report=final_report, carried=extension.carried)

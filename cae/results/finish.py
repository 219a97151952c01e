"""The end of a run, one way for every caller: the tables, the importance of the swept axes
(``cae.results.importance``), the reference errors, the report.

``cae sweep`` and ``cae resume`` call ``finish`` when Ray Tune returns; the live report calls
it every few minutes while a sweep runs, without the reference errors and the pictures
(those load the dataset and the best trials' checkpoints, which would compete with the
trials); ``cae report`` calls it for any run directory. A run at a URI is read through its
local mirror (``cae.run.directory``) and what is made goes back beside it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cae.config.errors import UserError
from cae.results.importance import write_importance
from cae.results.learning import still_learning_lines
from cae.results.tables import (
    EPOCHS_FILE,
    TRIALS_FILE,
    Frames,
    best_trial,
    carried_epochs,
    export,
    read_baselines,
    table_paths,
    trained_epochs,
    trial_configs,
)
from cae.run import directory as rundir
from cae.run.outcomes import unfinished_count


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Finished:
    """What ``finish`` made: the tables (as read back), the report and where it is shown."""

    frames: Frames
    report: Path | None = None  # the local file
    report_at: str | None = None  # where the user finds it (the URI of a run at a URI)


def baselines(run_dir: str, local: Path, data_dir: str | None = None,
              datasets: dict | None = None, say: Callable[[str], None] = _stderr) -> None:
    """Write the run's reference errors (``cae.results.baselines``) unless it has them; a dataset
    that cannot be read costs the references, not the run."""
    from cae.results import baselines as refs

    if read_baselines(local) is not None:
        return
    try:
        frame = refs.for_configs(trial_configs(local, data_dir), datasets)
    except UserError as exc:
        say(f"cae: no reference errors (PCA and the like) for the report: {exc}")
        return
    rundir.publish(run_dir, refs.write_baselines(local, frame))


def write_report(run_dir: str, local: Path, frames: Frames, out: str | None = None,
                 pictures: bool = True, data_dir: str | None = None) -> Path:
    """The HTML report of a run from its tables; for a run at a URI the checkpoints its
    pictures need (those of the best few trials) are fetched first."""
    from cae.report.page import write_report as write
    from cae.report.pictures import candidates
    from cae.report.run import best_trials, load_run

    if pictures and rundir.is_uri(run_dir):
        wanted = best_trials(frames.trials, candidates())["trial_dir"]
        rundir.fetch_checkpoints(run_dir, wanted, local)
    return write(local, out, pictures=pictures, data_dir=data_dir,
                 run=load_run(local, frames=frames))


def finish(run_dir: str, *, report: bool = True, pictures: bool = True,
           references: bool = True, out: str | None = None, data_dir: str | None = None,
           datasets: dict | None = None, say: Callable[[str], None] = _stderr) -> Finished:
    """Export the tables, compute the reference errors (``references``), write the report
    (``report``, with ``pictures``) and put them beside a run at a URI."""
    local = rundir.local_copy(run_dir)
    frames = export(local)
    rundir.publish(run_dir, *table_paths(local))
    rundir.publish(run_dir, write_importance(local, frames.trials, frames.epochs,
                                             rundir.read_spec(local)))
    for note in frames.notes:
        say(f"cae: note: {note}")
    if references:
        baselines(run_dir, local, data_dir, datasets, say)
    done = Finished(frames)
    if report:
        done.report = write_report(run_dir, local, frames, out, pictures, data_dir)
        if out is None and rundir.is_uri(run_dir):
            rundir.publish(run_dir, done.report)
            done.report_at = f"{run_dir.rstrip('/')}/{done.report.name}"
        else:
            done.report_at = str(done.report)
    return done


def summary(trials: pd.DataFrame, run_dir: str, axes: list[str] | None = None,
            n_trials: int = 0) -> str:
    """The lines ``cae sweep`` and ``cae resume`` end with: counts, the best trial (its
    values of the swept ``axes``), where the results are, the best trials per latent size
    still improving at max_epochs with the ``cae extend`` command that trains them on
    (``cae.results.learning``), and, when some of the sweep's ``n_trials`` will still run
    (started or not), how to continue."""
    counts = ", ".join(f"{n} {s.lower()}" for s, n in trials["status"].value_counts().items())
    carried = carried_epochs(trials)
    lines = [f"\ntrials: {len(trials)} ({counts}); trial-epochs: {trained_epochs(trials)}"
             + (f" (besides the {carried} the extended trials had trained)" if carried else "")]
    best = best_trial(trials)
    if best is not None:
        keys = axes or []
        axes = {k: best[k] for k in trials.columns
                if any(k == a or k.startswith(a + ".") for a in keys) and not pd.isna(best[k])}
        lines.append(f"best trial {best['trial_id']}: val {best['best_val_loss']:.5f}, test "
                     f"{best.get('test_loss', float('nan')):.5f}, params {int(best['params']):,}, "
                     f"latent {int(best['latent_size'])}")
        if axes:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in axes.items()))
    lines.append(f"results: {run_dir}/{TRIALS_FILE} and {EPOCHS_FILE}")
    lines += still_learning_lines(trials, run_dir)
    unfinished = unfinished_count(trials, n_trials)
    if unfinished:
        lines.append(f"{unfinished} trials did not finish; continue with: cae resume {run_dir}")
    return "\n".join(lines)

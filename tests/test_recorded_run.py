"""A real run directory, recorded by ``scripts/record_test_run.py`` (two tiny trials, Ray
Tune's own files and cae's), read without Ray: the tables, records fixed when made, and
the fallbacks for torn state files and torn checkpoints."""

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from cae.results import tables as results
from cae.run import checkpoints
from cae.run import state as runstate
from cae.run.outcomes import unfinished_mask

RECORDED = Path(__file__).resolve().parent / "data" / "recorded-run"


@pytest.fixture
def run(tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(RECORDED, dest)
    return dest


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_the_tables_of_a_real_run(run):
    frames = results.read_frames(run)
    trials, epochs = frames.trials, frames.epochs
    assert sorted(trials["model.latent_dim"]) == [2, 4] and trials["recorded"].all()
    assert set(trials["status"]) == {"TERMINATED"} and set(trials["stop_reason"]) == {
        "max_epochs"}
    assert (trials["latent_size"] == trials["model.latent_dim"]).all()
    assert (trials["epochs"] == 2).all() and len(epochs) == 4 and not frames.notes
    assert trials["test_loss"].notna().all()


def test_the_tables_read_back_are_those_export_wrote(run):
    written = results.export(run)
    back = results.tables(run)  # fresh now: read from the files, not from Ray's
    pd.testing.assert_frame_equal(written.trials, back.trials)
    pd.testing.assert_frame_equal(written.epochs, back.epochs)
    assert back.trials["model.channels"].tolist() == ["[2]", "[2]"]  # JSON text, as on disk


def test_records_keep_the_configuration_after_a_default_changes(run, monkeypatch):
    from cae.config.trial import TrialConfig

    before = results.read_frames(run).trials
    monkeypatch.setattr(TrialConfig.model_fields["lr"], "default", 0.5)
    TrialConfig.model_rebuild(force=True)
    results._planned_columns.cache_clear()
    try:
        assert TrialConfig().lr == 0.5  # the code's default did change
        after = results.read_frames(run).trials
        pd.testing.assert_frame_equal(before, after)
        assert (after["lr"] == 0.001).all()
        for record in run.glob("*/trial.json"):  # without records: today's defaults, said
            record.unlink()
        frames = results.read_frames(run)
        assert (frames.trials["lr"] == 0.5).all() and not frames.trials["recorded"].any()
        assert "no record of the configuration" in frames.notes[0]
    finally:
        monkeypatch.undo()
        TrialConfig.model_rebuild(force=True)
        results._planned_columns.cache_clear()


def test_a_torn_state_falls_back_to_the_copy_then_to_the_trials_own_files(run):
    state = max(run.glob("experiment_state-*.json"))
    _cut(state)
    statuses = runstate.read_statuses(run)
    assert statuses.source.parent.name == runstate.COPY_DIR and len(statuses.trials) == 2
    assert "last good copy" in statuses.note
    trials = results.read_frames(run).trials
    assert set(trials["status"]) == {"TERMINATED"}

    shutil.rmtree(run / runstate.COPY_DIR)
    frames = results.read_frames(run)
    assert "each trial's status comes from its own files" in frames.notes[0]
    assert set(frames.trials["status"]) == {"UNKNOWN"}
    assert not unfinished_mask(frames.trials).any()  # both reported their own end


def test_repair_sets_a_torn_state_aside_for_the_copy(run):
    state = max(run.glob("experiment_state-*.json"))
    whole = state.read_text()
    _cut(state)
    said = runstate.repair(run)
    assert "could not be read" in said and "last good copy" in said
    assert state.read_text() == whole and Path(f"{state}{runstate.TORN_SUFFIX}").is_file()
    assert runstate.repair(run) is None  # nothing left to repair
    # without the copy, the whole session goes aside and the sweep starts again
    shutil.rmtree(run / runstate.COPY_DIR)
    _cut(state)
    said = runstate.repair(run)
    assert said.startswith(f"{state.name} could not be read (cut short) and there is no "
                           "earlier state"), said
    assert not list(run.glob("experiment_state-*.json"))
    assert not list(run.glob("searcher-state-*.pkl"))  # the session's files go together


def test_repair_sets_a_session_aside_for_a_torn_searcher_state(run):
    """A full disk can cut the searcher's pickle short while the experiment state is whole:
    Tune's restore would then fail on the pickle, so the session goes aside all the same."""
    searcher = max(run.glob("searcher-state-*.pkl"))
    whole = searcher.read_bytes()
    assert runstate.keep_copy(run) is False  # the copy holds this state already
    for keep in (0.0, 0.5, 0.99):
        _cut(searcher, keep) if keep else searcher.write_bytes(b"")
        assert runstate.keep_copy(run) is None  # a torn state is never copied
        assert runstate.read_statuses(run).note.startswith(f"{searcher.name} could not be read")
        said = runstate.repair(run)
        assert said.startswith(f"{searcher.name} could not be read (cut short)"), said
        assert "last good copy" in said
        assert searcher.read_bytes() == whole
        assert Path(f"{searcher}{runstate.TORN_SUFFIX}").is_file()
        assert runstate.repair(run) is None


def test_a_state_written_a_moment_ago_is_not_copied_yet(run):
    """Tune copies its state files one by one: a copy taken while it writes could mix two
    moments, so only a state left alone for a second is copied."""
    searcher = max(run.glob("searcher-state-*.pkl"))
    searcher.write_bytes(searcher.read_bytes())  # rewritten, the same bytes, just now
    assert runstate.keep_copy(run) is None
    assert runstate.keep_copy(run, quiet=0) is False  # settled: the copy holds it already
    old = time.time() - 5
    os.utime(searcher, (old, old))
    assert runstate.keep_copy(run) is False


def test_a_torn_checkpoint_falls_back_to_the_one_before(run):
    trial = next(run.glob("run_trial_*"))
    fs, path = checkpoints.filesystem(trial)
    newest = checkpoints.load_newest(fs, path)
    assert newest.name == "checkpoint_000001" and not newest.skipped
    _cut(trial / "checkpoint_000001" / "state.pt", 0.3)
    found = checkpoints.load_newest(fs, path)
    assert found.name == "checkpoint_000000"
    assert len(found.skipped) == 1
    assert found.skipped[0].startswith("checkpoint_000001: state.pt unreadable (")
    assert checkpoints.epoch_of(found.history) == 1


def test_result_rows_lost_by_ray_come_back_from_the_checkpoints(run):
    want = results.read_frames(run)
    for path in run.glob("*/result.json"):
        path.write_text(path.read_text().splitlines()[0] + "\n")  # only epoch 1 left
    got = results.read_frames(run)
    cols = ["trial_id", "epoch", "val_loss", "train_loss"]
    pd.testing.assert_frame_equal(got.epochs[cols], want.epochs[cols])
    assert (got.trials["best_val_loss"] == want.trials["best_val_loss"]).all()


def test_the_recorded_run_is_what_the_recording_script_makes():
    record = json.loads(next(RECORDED.glob("*/trial.json")).read_text())
    assert set(record) >= {"config", "point", "params", "latent_size", "family", "config_id"}

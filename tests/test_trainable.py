"""The Ray trainable (``cae.sweep.trainable.run_trial``) run for real without Ray: Tune's report,
checkpoint and context replaced by a recorder that keeps checkpoints as Tune does, through a
pause and a resume, a Tune state behind the trial's own checkpoints, and a finished trial."""

import json
import shutil
import types
from pathlib import Path

import pytest
from ray import tune

import cae.sweep.trainable as trainable
from cae.config.trial import DataConfig
from cae.data.datasets import load

BASE = {"data": {"dataset": "sample", "train_limit": 200, "test_limit": 100},
        "model": {"channels": [2], "dense": [], "latent_dim": 2}, "max_epochs": 4,
        "patience": None, "batch_size": 50}
POINT = {"model.latent_dim": 2}


class Paused(Exception):
    """What Tune does to a function trainable it pauses: it stops it after a report."""


class Recorder:
    """Tune's side of one trial: reports, checkpoints copied into the trial's directory as
    ``checkpoint_NNNNNN`` (numbered on from ``start``), the checkpoint handed at a start."""

    def __init__(self, trial_dir: Path, given: Path | None = None, pause_at: int | None = None,
                 start: int = 0):
        self.trial_dir, self.given, self.pause_at, self.n = trial_dir, given, pause_at, start
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint=None) -> None:
        if checkpoint is not None:
            self.given = self.trial_dir / f"checkpoint_{self.n:06d}"
            shutil.copytree(checkpoint.path, self.given, dirs_exist_ok=True)  # as Tune does
            self.n += 1
        self.reports.append(dict(metrics))
        if self.pause_at is not None and metrics.get("epoch") == self.pause_at:
            raise Paused

    def get_checkpoint(self):
        return None if self.given is None else tune.Checkpoint(str(self.given))


def _no_ray(monkeypatch) -> None:
    """The trial's directory name and node id, which Ray's context would give."""
    monkeypatch.setattr(trainable.internals, "trial_dir_name", lambda: "trial_0")
    monkeypatch.setattr(trainable, "ray", types.SimpleNamespace(get_runtime_context=lambda:
                        types.SimpleNamespace(get_node_id=lambda: "node-0")))


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    _no_ray(monkeypatch)
    (tmp_path / "trial_0").mkdir()
    return tmp_path


def _run(monkeypatch, run_dir: Path, recorder: Recorder) -> list[dict]:
    monkeypatch.setattr(trainable.tune, "report", recorder.report)
    monkeypatch.setattr(trainable.tune, "get_checkpoint", recorder.get_checkpoint)
    datasets = {DataConfig(**BASE["data"]).source_key(): load(DataConfig(**BASE["data"]))}
    try:
        trainable.run_trial(POINT, BASE, datasets, str(run_dir))
    except Paused:
        pass
    return recorder.reports


def _epochs(reports: list[dict]) -> dict[int, float]:
    return {r["epoch"]: r["val_loss"] for r in reports}


@pytest.fixture
def uninterrupted(tmp_path_factory, monkeypatch) -> list[dict]:
    folder = tmp_path_factory.mktemp("whole")
    _no_ray(monkeypatch)
    (folder / "trial_0").mkdir()
    return _run(monkeypatch, folder, Recorder(folder / "trial_0"))


def test_a_paused_trial_goes_on_exactly_as_an_uninterrupted_one(run_dir, monkeypatch,
                                                                 uninterrupted):
    assert [r["epoch"] for r in uninterrupted] == [1, 2, 3, 4]
    assert uninterrupted[-1]["stop_reason"] == "max_epochs" and "test_loss" in uninterrupted[-1]
    first = _run(monkeypatch, run_dir, Recorder(run_dir / "trial_0", pause_at=2))
    record = json.loads((run_dir / "trial_0" / "trial.json").read_text())
    assert record["point"] == POINT and record["config"]["model"]["latent_dim"] == 2
    again = Recorder(run_dir / "trial_0", given=run_dir / "trial_0" / "checkpoint_000001",
                     start=2)
    second = _run(monkeypatch, run_dir, again)
    assert [r["epoch"] for r in second] == [3, 4]
    assert _epochs(first + second) == _epochs(uninterrupted)
    assert second[-1]["test_loss"] == uninterrupted[-1]["test_loss"]
    assert json.loads((run_dir / "trial_0" / "trial.json").read_text()) == record


def test_a_trial_ahead_of_tunes_state_reports_where_it_is_first(run_dir, monkeypatch,
                                                                uninterrupted):
    _run(monkeypatch, run_dir, Recorder(run_dir / "trial_0", pause_at=3))
    # Tune restored from an older state hands the epoch-1 checkpoint
    behind = Recorder(run_dir / "trial_0", given=run_dir / "trial_0" / "checkpoint_000000",
                      start=1)
    reports = _run(monkeypatch, run_dir, behind)
    assert [r["epoch"] for r in reports] == [3, 4]  # epoch 3 again, for the scheduler
    assert _epochs(reports) == {e: v for e, v in _epochs(uninterrupted).items() if e >= 3}
    assert "resumed_from" not in reports[0]  # nothing was skipped: nothing to say


def test_a_torn_newest_checkpoint_is_skipped_with_a_note(run_dir, monkeypatch, uninterrupted):
    _run(monkeypatch, run_dir, Recorder(run_dir / "trial_0", pause_at=2))
    newest = run_dir / "trial_0" / "checkpoint_000001" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    again = Recorder(run_dir / "trial_0", given=newest.parent, start=2)
    reports = _run(monkeypatch, run_dir, again)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    assert reports[0]["resumed_from"].startswith(
        "checkpoint_000000 (checkpoint_000001: state.pt unreadable")
    assert _epochs(reports) == _epochs(uninterrupted)


def test_a_finished_trial_reports_its_end_and_trains_nothing(run_dir, monkeypatch,
                                                             uninterrupted):
    _run(monkeypatch, run_dir, Recorder(run_dir / "trial_0"))
    final = sorted((run_dir / "trial_0").glob("checkpoint_*"))[-1]
    reports = _run(monkeypatch, run_dir, Recorder(run_dir / "trial_0", given=final, start=4))
    assert len(reports) == 1 and reports[0]["stop_reason"] == "max_epochs"
    assert reports[0]["test_loss"] == uninterrupted[-1]["test_loss"]

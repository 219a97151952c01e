"""Results frames from run directories: the one definition of an unfinished trial, and runs
whose experiment state cannot be read."""

import json

import pandas as pd
import pytest
import yaml

from cae.results.tables import load_frames
from cae.run.directory import RunDirError
from cae.run.outcomes import unfinished_mask


def test_unfinished_is_one_definition():
    trials = pd.DataFrame({
        "status": ["RUNNING", "PENDING", "PAUSED", "TERMINATED", "ERROR", "UNKNOWN", "UNKNOWN",
                   "UNKNOWN"],
        "stop_reason": ["running", "pending", "paused", "asha", "error: x", "max_epochs",
                        "patience", "unknown"],
    })
    assert unfinished_mask(trials).tolist() == [True, True, True, False, False, False, False,
                                                True]
    assert not unfinished_mask(pd.DataFrame()).any()


def test_trials_never_started_count_as_unfinished_and_the_summary_says_how_to_go_on():
    """A sweep stopped before half its trials started: the started ones all reached their own
    end, so the table holds no unfinished row, yet the run is not finished (exit 3), and its
    last lines must say how to continue."""
    from cae.results.finish import summary
    from cae.run.outcomes import all_finished, unfinished_count

    trials = pd.DataFrame({"status": ["TERMINATED", "RUNNING"],
                           "stop_reason": ["max_epochs", "max_epochs"], "epochs": [4, 4],
                           "trial_id": ["a", "b"], "best_val_loss": [0.1, 0.2],
                           "params": [10, 10], "latent_size": [4, 4]})
    assert unfinished_count(trials, 4) == 2 and not all_finished(trials, 4)
    assert unfinished_count(trials, 2) == 0 and all_finished(trials, 2)
    assert "2 trials did not finish; continue with: cae resume runs/x" in summary(
        trials, "runs/x", n_trials=4)
    assert "did not finish" not in summary(trials, "runs/x", n_trials=2)


def _run_dir(tmp_path, state: dict | None):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(
        {"name": "x", "trial": {"model": {"latent_dim": 8}}, "scheduler": {"kind": "fifo"}}))
    trial = tmp_path / "run_trial_00000"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"model.latent_dim": 4}))
    (trial / "result.json").write_text(json.dumps(
        {"trial_id": "a_00000", "epoch": 1, "train_loss": 0.1, "val_loss": 0.2,
         "stop_reason": "max_epochs", "time_total_s": 1.0}) + "\n")
    if state is not None:
        (tmp_path / "experiment_state-2026.json").write_text(json.dumps(state))
    return tmp_path


def test_frames_of_a_run_with_and_without_ray_state(tmp_path):
    trials, epochs = load_frames(_run_dir(tmp_path, None))
    row = trials.iloc[0]
    assert row["status"] == "UNKNOWN" and row["stop_reason"] == "max_epochs"
    assert not unfinished_mask(trials).any()
    assert row["model.latent_dim"] == 4 and row["latent_size"] == 4 and row["lr"] == 0.001
    assert len(epochs) == 1


def test_an_unreadable_experiment_state_costs_the_statuses_not_the_run(tmp_path):
    run = _run_dir(tmp_path, {"trial_data": [[{"name": "x"}, {}]]})  # no status, no logdir
    trials, epochs = load_frames(run)
    assert trials.iloc[0]["status"] == "UNKNOWN" and len(epochs) == 1


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="not a cae run directory"):
        load_frames(tmp_path)


def test_export_writes_config_columns_that_mix_kinds_as_json_text(tmp_path):
    # model 12 has convs [3, 4], its variants convs 1..4: one Parquet column cannot hold both
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(
        {"name": "x", "trial": {"model": {"preset": "study_b_model12"}},
         "scheduler": {"kind": "fifo"}}))
    for i, point in enumerate([{}, {"variant": {"model.convs": 2}},
                               {"variant": {"model.padding": "same"}}]):
        trial = tmp_path / f"run_trial_{i:05d}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps(point))
        (trial / "result.json").write_text(json.dumps(
            {"trial_id": f"t{i}", "epoch": 1, "train_loss": 0.1, "val_loss": 0.2 + i,
             "stop_reason": "max_epochs", "time_total_s": 1.0}) + "\n")
    from cae.results.tables import export, table_paths

    export(tmp_path)
    back = pd.read_parquet(table_paths(tmp_path)[0]).set_index("trial_id")
    assert [json.loads(v) for v in back.loc[["t0", "t1", "t2"], "model.convs"]] == [
        [3, 4], 2, [3, 4]]
    assert back.loc[["t0", "t1", "t2"], "model.padding"].tolist() == ["1", "1", "same"]
    assert back["model.kernel"].tolist() == [3, 3, 3]  # one kind: as it is


def test_the_best_epoch_is_the_trainers_own_under_min_delta(tmp_path):
    """With min_delta a lower validation loss that does not beat the best by that much is no
    improvement: the best weights (and test errors) stay at the earlier epoch, and so do the
    table's best_val_loss and best_epoch."""
    run = _run_dir(tmp_path, None)
    rows = [{"trial_id": "a_00000", "epoch": 1, "train_loss": 0.3, "val_loss": 0.30,
             "best_val_loss": 0.30, "best_epoch": 1, "time_total_s": 1.0},
            {"trial_id": "a_00000", "epoch": 2, "train_loss": 0.2, "val_loss": 0.29,
             "best_val_loss": 0.30, "best_epoch": 1, "time_total_s": 2.0,
             "stop_reason": "max_epochs"}]
    (next(run.glob("run_trial_*")) / "result.json").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    row = load_frames(run)[0].iloc[0]
    assert row["best_val_loss"] == 0.30 and row["best_epoch"] == 1
    assert row["last_val_loss"] == 0.29

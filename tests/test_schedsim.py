"""The scheduling simulator (benchmarks/simulator.py, benchmarks/schedsim.py): it replays
recorded real runs with their decisions and wall time, drives the real scheduler classes,
and the answer of a sweep that trained ahead leaves out what was not promoted."""

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import schedsim  # noqa: E402 (from benchmarks/, put on the path above)
import simulator as sim  # noqa: E402

# ---- replays of recorded real runs (benchmarks/results/schedtrace-*.json) ---------------


@pytest.mark.parametrize("name", ["quickstart-sha", "peer-sha"])
def test_a_recorded_run_replays_with_its_decisions_and_its_wall_time(name):
    trace = schedsim.load_trace(name)
    got = schedsim.replay(trace)
    assert got["same_decisions"]  # every trial stopped at the same rung
    assert got["trial_epochs"]["simulated"] == got["trial_epochs"]["measured"]
    assert abs(got["wall_error"]) <= 0.15  # simulated clock against the real one
    assert got["workers"] == 2 and 0.5 < got["simulated_utilisation"] <= 1.0


def test_a_replay_that_needs_epochs_the_run_did_not_train_says_so():
    trace = schedsim.load_trace("quickstart-sha")
    with pytest.raises(RuntimeError, match="the schedules differ"):  # FIFO runs everything
        schedsim.replay(trace, {"scheduler": {"kind": "fifo"}})


# ---- synthetic grids: the real classes, every scheduler ---------------------------------


def _profile() -> dict:
    """A small made-up profile of the peer grid: the 2-conv, 32-channel models best and
    slowest, errors falling with the latent size and the epochs."""
    prof = {}
    for lat in (4, 16, 64, 128):
        for ch in ([8, 8], [32, 32]):
            for convs in (1, 2):
                q = 0.01 + 0.02 / (1 + lat / 16) + (0.004 if ch[0] == 8 else 0) - 0.001 * convs
                prof[json.dumps([lat, ch, convs])] = {
                    "val_loss": [q * (1 + 2 / e) for e in range(1, 10)],
                    "seconds": [(2.0 if ch[0] == 8 else 8.0) * convs] * 9,
                    "own_end": "max_epochs"}
    return prof


def _work():
    return schedsim.synthetic_work(_profile(), {"trial": 0.05, "epoch": 0.02}, 0.1)


COSTS = sim.Costs(new_worker_s=1.0, segment_s=0.05, result_s=0.02, final_s=0.2,
                  handover_s=0.01)


def test_the_simulator_drives_the_real_searcher_and_schedulers():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from cae.schedule.grid import ShuffledSearcher
    from cae.schedule.halving import SyncHalvingScheduler
    from cae.schedule.schedulers import StratifiedScheduler

    for name, sub in (("asha", ASHAScheduler), ("sha", SyncHalvingScheduler),
                      ("default", SyncHalvingScheduler)):
        ctrl = sim.SimController(schedsim.synthetic_spec(32, schedsim.SCHEDULERS[name]),
                                 _work(), 4, COSTS)
        assert isinstance(ctrl.search_alg.searcher, ShuffledSearcher)
        assert isinstance(ctrl.scheduler, StratifiedScheduler)
        assert isinstance(ctrl.scheduler._factory(), sub)
        assert getattr(ctrl.scheduler._factory(), "work_ahead", False) == (name == "default")
    fifo = sim.SimController(schedsim.synthetic_spec(32, {"kind": "fifo"}), _work(), 4, COSTS)
    assert isinstance(fifo.scheduler, FIFOScheduler)


@pytest.mark.parametrize("n_trials,workers", [(64, 2), (64, 16), (256, 64), (256, 512)])
def test_every_scheduler_finishes_and_work_ahead_keeps_sha_s_answer(n_trials, workers):
    runs = {name: schedsim.run_point(n_trials, workers, name, _work(), COSTS)
            for name in schedsim.SCHEDULERS}
    assert runs["fifo"]["trial_epochs"] == n_trials * 9
    for r in runs.values():
        assert 0 < r["utilisation"] <= 1 and r["wall_s"] > 0
        assert len(r["answers"]) == 4  # one per latent size
    assert schedsim.same_answer(runs["default"]["answers"], runs["sha"]["answers"])
    # halving trains far fewer epochs than FIFO; what work ahead trains beyond SHA's epochs
    # (on workers that would idle) does not count, and it never takes longer than SHA here
    assert runs["sha"]["trial_epochs"] < 0.4 * runs["fifo"]["trial_epochs"]
    assert runs["default"]["counted_epochs"] == runs["sha"]["trial_epochs"]
    assert runs["default"]["trial_epochs"] >= runs["sha"]["trial_epochs"]
    assert runs["default"]["wall_s"] <= runs["sha"]["wall_s"] * 1.001


def test_synthetic_repeats_differ_by_seed_and_keep_their_architecture_s_cost():
    work_of = _work()
    a = work_of({"model.latent_dim": 4, "model.channels": [32, 32], "model.convs": 2,
                 "repeat": 0})
    b = work_of({"model.latent_dim": 4, "model.channels": [32, 32], "model.convs": 2,
                 "repeat": 1})
    c = work_of({"model.latent_dim": 4, "model.channels": [8, 8], "model.convs": 1,
                 "repeat": 0})
    assert a.val_loss != b.val_loss and len(a.val_loss) == 9
    assert 6 < sum(a.seconds) / sum(c.seconds) < 10  # 16 s against 2 s per epoch
    assert a == work_of({"model.latent_dim": 4, "model.channels": [32, 32],
                         "model.convs": 2, "repeat": 0})  # drawn once, the same every time


# ---- what trained ahead and was not promoted leaves out of the answer -------------------


def _write_run(path: Path, trials: dict[str, list[dict]]) -> Path:
    """A run directory in Ray Tune's layout, with the trials' result rows as given."""
    (path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "ahead", "trial": {"model": {"latent_dim": 8}, "max_epochs": 9},
        "space": {"model.latent_dim": {"grid": [4, 8]}, "model.convs": {"grid": [1, 2]}},
        "scheduler": {"kind": "sha", "stratify": ["model.latent_dim"]}}))
    state = {"trial_data": []}
    for i, (name, rows) in enumerate(trials.items()):
        latent, convs = map(int, name.split("-"))
        d = path / f"run_trial_{i:05d}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps({"model.latent_dim": latent,
                                                   "model.convs": convs}))
        (d / "result.json").write_text("".join(
            json.dumps({"trial_id": name, "time_total_s": float(r["epoch"]), **r}) + "\n"
            for r in rows))
        state["trial_data"].append([json.dumps({"relative_logdir": d.name, "trial_id": name,
                                                "status": "TERMINATED"}), "{}"])
    (path / "experiment_state-2026.json").write_text(json.dumps(state))
    return path


def test_epochs_trained_ahead_and_not_promoted_leave_best_pareto_and_table(tmp_path):
    from cae.report.figures import pareto_front
    from cae.report.table import best_per_latent
    from cae.results.tables import load_frames

    ahead = {"speculative": 3, "speculative_rung_value": 0.30}
    trials = {
        # promoted at rung 3 after training ahead to 5: its epochs 4-5 count
        "4-2": [{"epoch": e, "val_loss": 0.4 - 0.02 * e} for e in (1, 2, 3)]
        + [{"epoch": e, "val_loss": 0.4 - 0.02 * e, **ahead} for e in (4, 5)]
        + [{"epoch": e, "val_loss": 0.4 - 0.02 * e} for e in range(6, 10)]
        + [{"epoch": 9, "val_loss": 0.22, "stop_reason": "max_epochs", "test_loss": 0.23}],
        # trained ahead to 8, ended there (patience), then not promoted at rung 3
        "4-1": [{"epoch": e, "val_loss": 0.5 - 0.06 * e} for e in (1, 2, 3)]
        + [{"epoch": e, "val_loss": 0.5 - 0.06 * e, **ahead} for e in range(4, 8)]
        + [{"epoch": 8, "val_loss": 0.01, **ahead, "stop_reason": "patience",
            "test_loss": 0.01}],
        "8-1": [{"epoch": e, "val_loss": 0.3 - 0.01 * e} for e in range(1, 10)]
        + [{"epoch": 9, "val_loss": 0.21, "stop_reason": "max_epochs", "test_loss": 0.2}],
        "8-2": [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.45,
                                                 "speculative": 1}],
        # trained ahead of rung 1 and stopped there, its flags lost (Ray rewrote its
        # result.json from an older copy; the checkpoint's history has no flags)
        "4-3": [{"epoch": 1, "val_loss": 0.6}, {"epoch": 2, "val_loss": 0.05}],
    }
    run = _write_run(tmp_path, trials)
    frame, epochs = load_frames(run)
    by = frame.set_index("trial_id")
    # the loser: epochs to its rung only, stopped by the scheduler, no test error
    assert by.loc["4-1", "best_val_loss"] == pytest.approx(0.32)  # epoch 3, not 0.01
    assert by.loc["4-1", "epochs"] == 3 and by.loc["4-1", "speculative_epochs"] == 5
    assert by.loc["4-1", "stop_reason"] == "sha" and math.isnan(by.loc["4-1", "test_loss"])
    assert by.loc["8-2", "best_val_loss"] == 0.5 and by.loc["8-2", "epochs"] == 1
    assert by.loc["4-3", "best_val_loss"] == 0.6 and by.loc["4-3", "epochs"] == 1
    assert by.loc["4-3", "speculative_epochs"] == 1 and by.loc["4-3", "stop_reason"] == "sha"
    # the winner: everything counts
    assert by.loc["4-2", "best_val_loss"] == pytest.approx(0.22)
    assert by.loc["4-2", "epochs"] == 9 and by.loc["4-2", "speculative_epochs"] == 0
    # every epoch stays in the epochs frame, flagged
    assert len(epochs[epochs["trial_id"] == "4-1"]) == 8
    assert epochs["speculative"].notna().sum() == 2 + 5 + 1 and len(epochs) == 9 + 8 + 9 + 2 + 2
    # the Pareto front and the best-per-latent table see the rung's value, not the 0.01
    front = pareto_front(frame)
    assert "4-1" not in set(front["trial_id"]) and front["best_val_loss"].min() > 0.2
    table = best_per_latent(frame, yaml.safe_load((run / "spec.yaml").read_text()))
    assert table.set_index("latent_size").loc[4, "best_val_loss"] == pytest.approx(0.22)


def test_the_simulator_counts_a_trial_as_the_results_do():
    from cae.results.tables import counted_epochs

    rows = [{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 0.5, "speculative": 1}]
    assert list(counted_epochs({r["epoch"]: r for r in rows})) == [1]
    assert sim.counted_rows(rows) == rows[:1]
    rows.append({"epoch": 3, "val_loss": 0.4})
    assert list(counted_epochs({r["epoch"]: r for r in rows})) == [1, 2, 3]
    assert sim.counted_rows(rows) == rows
    again = {"epoch": 3, "val_loss": 0.4, "reported_again": True}
    assert sim.counted_rows([*rows, again]) == [*rows[:2], again]  # the last report counts


# ---- a real sweep, recorded and replayed -----------------------------------------------


@pytest.mark.slow
def test_a_real_sweep_is_replayed_with_the_same_decisions(tmp_path):
    import schedtrace

    from cae.config.spec import load_spec

    spec = load_spec(str(REPO / "sweeps" / "quickstart.yaml"), [
        "trial.max_epochs=4", "trial.data.train_limit=600", "trial.patience=null",
        "scheduler.work_ahead=false"])
    trace = schedtrace.record(spec, tmp_path, "real")
    got = schedsim.replay({**trace, "events": trace["events"]})
    assert got["same_decisions"] and got["trial_epochs"]["measured"] < 16 * 4
    assert abs(got["wall_error"]) <= 0.25  # a short run: the fixed costs weigh more


# ---- fused packs (benchmarks/packsim.py) ---------------------------------------------------


def test_packs_under_halving_decide_as_one_trial_per_gpu_and_regroup_the_survivors():
    """A slice of Study B's grid with 3 seeds (latent 4 and 8, one conv per stage: 576
    trials): the real fused book and scheduler stop the same trials at the same rungs
    as the real unfused ones (the same trial-epochs), members share their packs' epochs
    (fewer pack-epochs than trial-epochs), FIFO packs, training everything, take longer, and
    a pack of K costs as HFTA's scaling has it."""
    import packsim

    from cae.config.points import trial_config
    from cae.sweep.packplan import trial_points
    from cae.sweep.tuner import param_space

    assert packsim.pack_s(2.0, 1, 2.4) == 2.0 and packsim.pack_s(2.0, 12, 2.4) == 10.0
    spec = packsim.grid(3)
    spec.space["model.latent_dim"] = {"grid": [4, 8]}
    spec.space["model.convs"] = {"grid": [1]}
    points = trial_points(spec, param_space(spec))
    keys = [sim.config_key(p) for p in points]
    seconds = {k: packsim.alone_s(trial_config(spec.trial, p)) for k, p in zip(keys, points)}
    drawn = packsim.curves(keys, 30)
    works = {k: sim.Work(drawn[k], (seconds[k],) * 30) for k in keys}
    alone = packsim.unfused(spec, works, 2)
    packs = packsim.halving_packs(spec, works, seconds, 2, 2.4)
    assert len(points) == 576 and alone.trial_epochs == packs["trial_epochs"]
    assert packs["pack_epochs"] < packs["trial_epochs"]  # members shared their packs' epochs
    assert packsim.fifo_packs(spec, seconds, 2, 2.4) > packs["wall_s"]

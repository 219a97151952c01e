"""Fused packs under successive halving, run for real in this process: the sweep's book
(``cae.schedule.packbook``, as ``cae.sweep.packplan.fused_halving`` makes it) hands out packs,
and the one trainable (``cae.sweep.trainable.run_trial``) trains each, its report to Tune
filed in the book as ``cae.schedule.packed.PackScheduler`` files it. In float64, where
rounding cannot hide a bug: every member computes what its trial computes alone, across
every regrouping, and the halving promotes the trials that unfused halving promotes."""

import json
import types
from pathlib import Path

import pytest
import yaml
from helpers import spec_with
from ray.tune.utils import flatten_dict

import cae.sweep.trainable as trainable
from cae.config.points import trial_config
from cae.config.spec import SweepSpec, rungs, stratum_of
from cae.data.datasets import load
from cae.schedule.packbook import STOP, PackBook, SyncDecider, chunks
from cae.schedule.packed import member_reports
from cae.sweep.packplan import fused_halving, halving_plan
from cae.sweep.tuner import param_space
from cae.train import loop
from cae.train.trainer import Trainer

TOL = 1e-9  # relative, float64

SPEC = {
    "name": "fh",
    "trial": {"data": {"dataset": "sample", "train_limit": 120, "test_limit": 40},
              "model": {"channels": [2, 4], "dense": [16], "latent_dim": 4,
                        "batchnorm": True, "dropout": 0.1},
              "batch_size": 36, "eval_batch_size": 64, "max_epochs": 5, "patience": None,
              "device": "cpu"},
    "space": {"lr": {"grid": [0.001, 0.003, 0.01]}, "model.latent_dim": {"grid": [2, 4]}},
    "num_samples": 2,
    "scheduler": {"kind": "sha", "stratify": ["model.latent_dim"], "grace_period": 1,
                  "reduction_factor": 3, "work_ahead": False},
    "fuse": {"max_members": 3},
}


class Stopped(Exception):
    """What Tune does to a pack its scheduler stops: it ends it after the report."""


class Sweep:
    """Tune's side of a fused sweep under halving, one pack at a time in this process."""

    def __init__(self, spec: SweepSpec, run_dir: Path, monkeypatch):
        self.spec, self.run_dir = spec, run_dir
        self.searcher, self.scheduler = fused_halving(spec, param_space(spec), str(run_dir),
                                                      spec.trial["max_epochs"])
        self.book: PackBook = self.searcher.book
        # what Tune hands a scheduler: its search algorithm (a SearchGenerator around the
        # searcher) and its trials (none waits: packs run one at a time here)
        self.controller = types.SimpleNamespace(
            search_alg=types.SimpleNamespace(searcher=self.searcher), get_trials=lambda: [])
        self.datasets = {}
        self.packs: list[tuple[str, dict, list[int]]] = []  # (id, config, epochs reported)
        self.monkeypatch = monkeypatch

    def run(self) -> None:
        while True:
            pack_id = f"{len(self.packs):08x}"
            config = self.searcher.suggest(pack_id)
            if config is None:  # Tune asks its scheduler what to run: nothing waits
                assert self.scheduler.choose_trial_to_run(self.controller) is None
                config = self.searcher.suggest(pack_id)
            if config == "FINISHED":
                return
            assert config is not None, "the book waits for nothing"
            self._train(pack_id, config)

    def _train(self, pack_id: str, config: dict) -> None:
        name = f"run_pack_{pack_id}_{len(self.packs) + 1}_x"
        (self.run_dir / name).mkdir()
        (self.run_dir / name / "params.json").write_text(json.dumps(config))
        epochs: list[int] = []
        self.packs.append((pack_id, config, epochs))

        trial = types.SimpleNamespace(trial_id=pack_id)

        def report(metrics: dict, checkpoint=None) -> None:
            epochs.append(metrics["epoch"])
            assert member_reports(flatten_dict(metrics)) == member_reports(metrics)
            decision = self.scheduler.on_trial_result(self.controller, trial,
                                                      flatten_dict(metrics))
            if decision == "STOP":
                raise Stopped

        m = self.monkeypatch
        m.setattr(trainable.internals, "trial_dir_name", lambda: name)
        m.setattr(trainable.tune, "report", report)
        m.setattr(trainable.tune, "get_context", lambda: types.SimpleNamespace(
            get_trial_id=lambda: pack_id))
        m.setattr(trainable, "ray", types.SimpleNamespace(get_runtime_context=lambda:
                  types.SimpleNamespace(get_node_id=lambda: "node-0")))
        cfg = trial_config(self.spec.trial, config["pack"][0])
        key = cfg.data.source_key()
        self.datasets.setdefault(key, load(cfg.data))
        try:
            trainable.run_trial(config, self.spec.trial, self.datasets, str(self.run_dir))
        except Stopped:
            pass
        self.scheduler.on_trial_complete(self.controller, trial, None)

    def histories(self) -> dict[str, list[dict]]:
        """Each member's epochs (by book id), from the newest checkpoint in its folder."""
        from cae.run.checkpoints import newest_history

        return {mid: newest_history(self.run_dir / seat.home)["epochs"]
                for mid, seat in self.book.seats.items()}


def _spec(**changes) -> SweepSpec:
    return SweepSpec.model_validate(spec_with(SPEC, **changes))


def _alone(spec: SweepSpec, point: dict, epochs: int) -> list[dict]:
    """A trial trained alone (``Trainer``, plain PyTorch) for ``epochs`` epochs."""
    cfg = trial_config(spec.trial, point)
    trainer = Trainer(cfg, load(cfg.data))
    loop.fit(trainer, until=epochs)
    return trainer.history


def _unfused_halving(spec: SweepSpec, curves: dict[str, list[dict]], points: dict[str, dict]
                     ) -> dict[str, int]:
    """The epochs unfused halving trains each trial, from its curve alone: every trial of a
    stratum to the first rung, then each rung decided by the rung book of ``sha`` (as
    ``SyncHalvingScheduler`` decides it), the promoted on to the next."""
    s = spec.scheduler
    max_t = spec.trial["max_epochs"]
    at = rungs(s.grace_period, s.reduction_factor, max_t)
    strata: dict[tuple, list[str]] = {}
    for mid, point in points.items():
        strata.setdefault(stratum_of(point, s.stratify), []).append(mid)
    trained = {}
    for members in strata.values():
        decider = SyncDecider(at, s.reduction_factor, "min", max_t)
        seats = {m: types.SimpleNamespace(trial_id=m, point=points[m], group="g", epoch=0,
                                          value=None) for m in members}
        for seat in seats.values():
            decider.add(seat)
        alive = list(members)
        for target in [*at, max_t]:
            for m in alive:
                seats[m].epoch, seats[m].value = target, curves[m][target - 1]["val_loss"]
                assert decider.result(seats[m]) in ("wait", "continue", STOP)
            promoted, _ = decider.decide()
            for m in alive:
                trained[m] = target
            alive = sorted(s.trial_id for s in promoted)
    return trained


@pytest.mark.slow
@pytest.mark.parametrize("work_ahead", [False, True])
def test_a_fused_halving_sweep_is_the_unfused_one(tmp_path, monkeypatch, float64, work_ahead):
    spec = _spec(**{"scheduler.work_ahead": work_ahead})
    sweep = Sweep(spec, tmp_path, monkeypatch)
    sweep.run()
    points = {mid: seat.point for mid, seat in sweep.book.seats.items()}
    fused = sweep.histories()
    curves = {mid: _alone(spec, point, spec.trial["max_epochs"])
              for mid, point in points.items()}
    # the same trials stop at the same rungs: the same trial-epochs
    want = _unfused_halving(spec, curves, points)
    got = {mid: len(h) for mid, h in fused.items()}
    assert got == want
    assert sum(got.values()) == 12 * 1 + 4 * 2 + 2 * 2  # 12 to rung 1, 4 to 3, 2 to 5
    # every epoch of every member equals its trial's alone, across regroupings
    regrouped = 0
    for mid, history in fused.items():
        for got_epoch, want_epoch in zip(history, curves[mid], strict=False):
            for key in ("train_loss", "val_loss", "best_val_loss"):
                assert got_epoch[key] == pytest.approx(want_epoch[key], rel=TOL, abs=0), key
        regrouped += len({h["pack"] for h in history}) > 1
    assert regrouped == 4  # each stratum's 2 survivors of rung 1 trained in a later pack
    # the survivors of a stratum's rung share one pack: 3 first packs per stratum, then one
    sizes = sorted(len(c["ids"]) for _, c, _ in sweep.packs)
    assert sizes == [1, 1, 2, 2, 3, 3, 3, 3] or work_ahead
    # a regrouped pack says where its members are, in their own folders
    later = [c for _, c, _ in sweep.packs if "homes" in c]
    assert later and all(c["epoch"] in (1, 3) for c in later if not work_ahead)
    # the members stopped by the halving are marked, the others ended by their own rule
    for mid, seat in sweep.book.seats.items():
        marked = (tmp_path / seat.home / "stopped.json").is_file()
        assert marked == (got[mid] < spec.trial["max_epochs"]), mid
        assert seat.fate == ("stopped" if marked else "ended")


def test_the_dry_runs_packs_are_the_ones_a_sweep_forms():
    plan = halving_plan(_spec(), param_space(_spec()))
    assert plan == {f"model.latent_dim={n}": [(0, 1, [3, 3]), (1, 3, [2]), (3, 5, [1])]
                    for n in (2, 4)}


def test_chunks_make_the_fewest_packs_of_near_equal_size():
    assert chunks(list(range(10)), 8) == [list(range(5)), list(range(5, 10))]
    assert [len(c) for c in chunks(list(range(7)), 3)] == [3, 2, 2]
    assert chunks([], 4) == [] and chunks([1], 4) == [[1]]


def test_a_spec_with_fusion_and_halving_is_accepted_and_planned(tmp_path, capsys):
    from cae.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "packs under sha, survivors regrouped at each rung" in out
    assert "epoch 1 (from the start): 2 packs (3, 3 members)" in out
    assert "epochs 2-3 (after the rung at epoch 1): 1 pack (2 members)" in out
    assert "epochs 4-5 (after the rung at epoch 3): 1 pack (1 member)" in out
    assert "pack-epochs in all: 12 (for 24 trial-epochs)" in out

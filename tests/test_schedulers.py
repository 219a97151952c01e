"""Early stopping per stratum (ASHA, synchronous SHA) and the seeded shuffled start order.

The Ray runs use a tiny deterministic trainable: its loss is ``quality + offset(latent) +
1/epoch``, so the ranking at every rung, each stratum's best and the global best are known.
"""

import json
import random
import sys
import tempfile
import types
from pathlib import Path

import pytest

from cae.config.spec import stratum_of
from cae.schedule import create_scheduler
from cae.schedule.grid import shuffled_search
from cae.schedule.halving import SyncHalvingScheduler
from cae.schedule.schedulers import StratifiedScheduler

MAX_T = 9  # rungs at 1 and 3 with grace 1, reduction factor 3
LATENTS, QUALITIES = [4, 8], [0.1, 0.2, 0.3, 0.4]


def _loss(config: dict, epoch: int) -> float:
    # latent 8 is globally worse: without strata its best would lose to latent 4's
    return config["quality"] + (0.5 if config["model.latent_dim"] == 8 else 0.0) + 1.0 / epoch


def _space(quality_order=QUALITIES, latent_first=False):
    """Ray starts grid trials in grid order, the first key varying fastest."""
    from ray import tune

    axes = [("quality", tune.grid_search(list(quality_order))),
            ("model.latent_dim", tune.grid_search(LATENTS))]
    return dict(axes[::-1] if latent_first else axes)


# ---- stratum_of, create_scheduler, shuffled_search (no Ray runtime) ---------------------


def test_stratum_of_plain_list_and_variant_values():
    config = {"model.latent_dim": 8, "model.channels": [4, 8], "lr": 0.1,
              "variant": {"model.preset": "kmnist", "task.name": "denoise"}}
    assert stratum_of(config, ["model.latent_dim"]) == (8,)
    key = stratum_of(config, ["model.channels", "model.preset", "model.latent_dim"])
    assert key == ("[4, 8]", "kmnist", 8) and hash(key)
    assert stratum_of(config, []) == ()
    # a later variant overrides an earlier key, as apply_point applies them
    assert stratum_of({"task.name": "reconstruct", "variant_b": {"task.name": "colorize"}},
                      ["task.name"]) == ("colorize",)
    with pytest.raises(ValueError, match="'model.kernel' is not an axis"):
        stratum_of(config, ["model.kernel"])


def test_create_scheduler_kinds():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    assert isinstance(create_scheduler("fifo", [], max_t=12, grace_period=1,
                                     reduction_factor=3), FIFOScheduler)
    for kind, cls in (("asha", ASHAScheduler), ("sha", SyncHalvingScheduler)):
        s = create_scheduler(kind, ["model.latent_dim"], max_t=12, grace_period=1,
                           reduction_factor=3)
        assert isinstance(s, StratifiedScheduler) and isinstance(s._factory(), cls)
        # the same metric/mode in tune.TuneConfig agree; another metric is refused
        assert s.set_search_properties("val_loss", "min")
        assert not s.set_search_properties("train_loss", None)
    assert not create_scheduler("sha", [], max_t=12, grace_period=1,
                              reduction_factor=3).supports_buffered_results
    assert SyncHalvingScheduler(max_t=12, grace_period=1, reduction_factor=3).rungs == [1, 3, 9]
    assert SyncHalvingScheduler(max_t=12, grace_period=2, reduction_factor=2.5).rungs == [2, 5]
    with pytest.raises(ValueError, match="'hyperband' is not one of asha, sha, fifo"):
        create_scheduler("hyperband", [], max_t=12, grace_period=1, reduction_factor=3)


def test_shuffled_search_order_is_seeded_and_covers_the_grid():
    from ray import tune

    space = {"model.latent_dim": tune.grid_search([4, 8, 16, 32]),
             "model.channels": tune.grid_search([[4, 8], [8, 16]]),
             "variant": tune.grid_search([{"task.name": "denoise"}, {"task.name": "colorize"}]),
             "lr": tune.loguniform(1e-4, 1e-2), "batch_size": 64}

    def order(seed):
        s = shuffled_search(space, num_samples=3, seed=seed)
        assert s.param_space == {} and s.num_samples == 4 * 2 * 2 * 3
        configs = []
        while (c := s.search_alg.suggest(f"t{len(configs)}")) != "FINISHED":
            configs.append(c)
        return configs

    a, again, b = order(0), order(0), order(1)
    assert a == again  # same seed: same trials, same order, same samples
    def grid(cs):
        return [(c["model.latent_dim"], json.dumps(c["model.channels"]),
                 c["variant"]["task.name"]) for c in cs]

    assert grid(a) != grid(b)  # another seed: another order
    for cs in (a, b):
        assert sorted(cs[0]) == ["batch_size", "lr", "model.channels", "model.latent_dim",
                                 "repeat", "variant"]  # flat dotted keys, and the repeat
        counts = {}
        for point in grid(cs):
            counts[point] = counts.get(point, 0) + 1
        assert len(counts) == 16 and set(counts.values()) == {3}  # every point x 3, once each
        repeats = {p: sorted(c["repeat"] for c in cs if grid([c])[0] == p) for p in counts}
        assert set(map(tuple, repeats.values())) == {(0, 1, 2)}  # repeats 0, 1, 2 of each
        assert all(1e-4 <= c["lr"] <= 1e-2 for c in cs) and len({c["lr"] for c in cs}) == 48
    assert grid(a) != sorted(grid(a))  # not grid order


# ---- synchronous SHA against a simulated controller: order does not matter --------------


class _Trial:
    def __init__(self, config: dict, trial_id: str):
        self.config, self.trial_id, self.status, self.last_result = config, trial_id, "PENDING", {}

    def set_status(self, status: str) -> None:  # as Tune's Trial (cae.sweep.internals.keep_paused)
        self.status = status


class _Controller:
    def __init__(self, scheduler):
        self.scheduler, self.search_alg = scheduler, None

    def stop_trial(self, trial):
        if trial.status in ("PENDING", "PAUSED"):
            self.scheduler.on_trial_remove(self, trial)
        trial.status = "TERMINATED"

    def _mark_trial_to_checkpoint(self, trial):  # what Tune's controller offers the scheduler
        self.marked = getattr(self, "marked", []) + [trial.trial_id]


def _simulate(points: list[dict], seed: int, stratify=("model.latent_dim",)) -> dict:
    """Trials added in a random order get random turns on 2 slots; (0.2, 8) crashes in its
    second epoch, (0.1, 4) ends itself (patience) after 2. Returns {(quality, latent): epochs}."""
    rng = random.Random(seed)
    points = rng.sample(points, len(points))
    sched = create_scheduler("sha", list(stratify), max_t=MAX_T, grace_period=1,
                           reduction_factor=3)
    ctrl = _Controller(sched)
    trials = [_Trial(p, f"id{rng.randrange(10**6):06d}") for p in points]
    for t in trials:
        sched.on_trial_add(ctrl, t)
    epochs = {t.trial_id: 0 for t in trials}
    running: list = []
    while True:
        while len(running) < 2 and (t := sched.choose_trial_to_run(ctrl)):
            t.status = "RUNNING"
            running.append(t)
        if not running:
            break
        t = rng.choice(running)
        name, epoch = (t.config["quality"], t.config["model.latent_dim"]), epochs[t.trial_id] + 1
        if name == (0.2, 8) and epoch == 2:  # crashes during its second epoch
            running.remove(t)
            t.status = "ERROR"
            sched.on_trial_error(ctrl, t)
            continue
        epochs[t.trial_id] = epoch
        result = t.last_result = {"epoch": epoch, "val_loss": _loss(t.config, epoch)}
        decision = sched.on_trial_result(ctrl, t, result)
        if decision == "CONTINUE" and not (name == (0.1, 4) and epoch == 2):
            continue
        running.remove(t)
        if decision == "PAUSE":
            t.status = "PAUSED"
        else:  # STOP, or the trial returned (patience)
            sched.on_trial_complete(ctrl, t, result)
            t.status = "TERMINATED"
    assert all(t.status in ("TERMINATED", "ERROR") for t in trials)
    return {(t.config["quality"], t.config["model.latent_dim"]): epochs[t.trial_id]
            for t in trials}


def test_sha_outcome_does_not_depend_on_start_or_arrival_order():
    points = [{"quality": q, "model.latent_dim": lat} for q in QUALITIES for lat in LATENTS]
    outcomes = [_simulate(points, seed) for seed in range(25)]
    assert all(o == outcomes[0] for o in outcomes)
    # rung 1 keeps the best 2 of 4 per latent; at rung 3 an ended trial competes with its
    # last value: (0.1, 4) ended at epoch 2 with 0.6 and loses to (0.2, 4) at 0.53
    assert outcomes[0] == {(0.1, 4): 2, (0.2, 4): 9, (0.3, 4): 1, (0.4, 4): 1,
                           (0.1, 8): 9, (0.2, 8): 1, (0.3, 8): 1, (0.4, 8): 1}


def test_sha_ties_are_broken_by_config_not_by_trial_id():
    points = [{"quality": 0.1, "model.latent_dim": 4, "name": n} for n in "dcba"]
    for seed in range(5):
        sched = create_scheduler("sha", [], max_t=MAX_T, grace_period=1, reduction_factor=3)
        ctrl = _Controller(sched)
        trials = [_Trial(p, f"id{i}") for i, p in enumerate(random.Random(seed).sample(points, 4))]
        for t in trials:
            sched.on_trial_add(ctrl, t)
        for t in trials:
            t.status = "RUNNING"
            decision = sched.on_trial_result(ctrl, t, {"epoch": 1, "val_loss": 1.0})
            t.status = {"PAUSE": "PAUSED", "STOP": "TERMINATED"}.get(decision, t.status)
        alive = sorted(t.config["name"] for t in trials if t.status != "TERMINATED")
        assert alive == ["a", "b"]  # ceil(4 / 3) = 2, the first two by config


# ---- work ahead: the same decisions as SHA, under any arrival order --------------------


class _AheadController(_Controller):
    """A controller that can also stop or pause a running trial (work ahead needs both)."""

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.trials, self.running, self.inflight, self.current = [], [], [], None

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        if trial.status == "RUNNING":
            self.scheduler.on_trial_complete(self, trial, dict(trial.last_result))
            if trial in self.running:  # else it was pausing
                self.running.remove(trial)
                if trial is not self.current:  # stopped mid-epoch by another's result: Ray
                    self.inflight.append(trial)  # may still deliver the epoch it trained
        elif trial.status in ("PENDING", "PAUSED"):
            self.scheduler.on_trial_remove(self, trial)
        trial.status = "TERMINATED"


def _simulate_ahead(points: list[dict], seed: int, work_ahead: bool, slots: int,
                    trials: list | None = None, state: dict | None = None,
                    crash_after: int | None = None):
    """Like ``_simulate``, with work ahead possible: trials added in a random order get
    random turns on ``slots`` workers; (0.1, 4) ends itself (patience) after 2 epochs.
    Every result goes through the speculation callback, as in a sweep. Returns {(quality,
    latent, x): rows reported}. ``crash_after``: stop after that many results and return the
    trials (for a restore)."""
    from cae.schedule.schedulers import speculation_marks

    rng = random.Random(seed)
    sched = create_scheduler("sha", ["model.latent_dim"], max_t=MAX_T, grace_period=1,
                           reduction_factor=3, work_ahead=work_ahead)
    marks = speculation_marks(sched)
    ctrl = _AheadController(sched)
    if trials is None:
        points = rng.sample(points, len(points))
        trials = [_Trial(p, f"id{rng.randrange(10**6):06d}") for p in points]
        for t in trials:
            t.rows = []
    ctrl.trials = trials
    for t in trials:
        sched.on_trial_add(ctrl, t)
    ctrl.running = [t for t in trials if t.status == "RUNNING"]
    pausing = []  # Ray keeps a pausing trial RUNNING until its checkpoint is saved
    results = 0
    while True:
        while pausing and (not ctrl.running or rng.random() < 0.5):
            t = pausing.pop(rng.randrange(len(pausing)))
            t.status = "PAUSED" if t.status == "RUNNING" else t.status
        while len(ctrl.running) + len(pausing) < slots and (
                t := sched.choose_trial_to_run(ctrl)):
            t.status = "RUNNING"
            ctrl.running.append(t)
        if ctrl.inflight and rng.random() < 0.5:  # a stopped trial's last epoch arrives
            t = ctrl.inflight.pop()
            epoch = t.rows[-1]["epoch"] + 1 if t.rows else 1
            result = {"epoch": epoch, "val_loss": _loss(t.config, epoch)}
            sched.on_trial_result(ctrl, t, dict(result))
            marks.on_trial_result(0, trials, t, result)
            t.rows.append(result)
            continue
        if not ctrl.running and not pausing:
            break
        if not ctrl.running:
            continue
        if crash_after is not None and results >= crash_after:
            return trials
        t = rng.choice(ctrl.running)
        done = t.rows[-1]["epoch"] if t.rows else 0
        name = (t.config["quality"], t.config["model.latent_dim"])
        own_end = 2 if name == (0.1, 4) else MAX_T
        epoch = min(done + 1, own_end)  # after its end: its final result reported again
        result = {"epoch": epoch, "val_loss": _loss(t.config, epoch)}
        if epoch == own_end and own_end < MAX_T:
            result["stop_reason"] = "patience"
        ctrl.current = t
        decision = sched.on_trial_result(ctrl, t, dict(result))
        ctrl.current = None
        marks.on_trial_result(0, trials, t, result)
        t.last_result = result
        t.rows.append(result)
        results += 1
        if t.status != "RUNNING":  # stopped while the scheduler decided
            continue
        if decision == "STOP" or (decision == "CONTINUE" and "stop_reason" in result):
            ctrl.current = t  # stopped on its own result: nothing more in flight
            ctrl.stop_trial(t)
            ctrl.current = None
        elif decision == "PAUSE":
            ctrl.running.remove(t)
            pausing.append(t)
    assert all(t.status == "TERMINATED" for t in trials)
    if crash_after is not None:
        return trials
    return {(t.config["quality"], t.config["model.latent_dim"], t.config["x"]): t.rows
            for t in trials}


def _answer(rows: list[dict]) -> tuple[int, float]:
    """The epochs that count and the best of them (``cae.results.tables.counted_epochs``)."""
    from cae.results.tables import counted_epochs

    counted = counted_epochs({r["epoch"]: r for r in rows})
    return max(counted), min(r["val_loss"] for r in counted.values())


POINTS = [{"quality": q, "model.latent_dim": lat, "x": x}
          for q in QUALITIES for lat in LATENTS for x in (0, 1)]  # 16 trials, 8 per stratum


def test_work_ahead_decides_as_sha_under_any_arrival_order():
    sha = {k: _answer(v) for k, v in _simulate_ahead(POINTS, 0, False, 2).items()}
    ahead_epochs = []
    for seed in range(40):
        for slots in (2, 3, 5, 8):
            got = _simulate_ahead(POINTS, seed, True, slots)
            assert {k: _answer(v) for k, v in got.items()} == sha, (seed, slots)
            ahead_epochs.append(sum(len({r["epoch"] for r in rows}) for rows in got.values()))
    # it did work ahead (trained epochs that did not count) somewhere
    assert max(ahead_epochs) > sum(e for e, _ in sha.values())


def test_a_trial_trained_ahead_and_not_promoted_keeps_only_its_epochs_to_the_rung():
    from cae.results.tables import counted_epochs

    flagged = []
    for seed in range(40):
        for key, rows in _simulate_ahead(POINTS, seed, True, 8).items():
            ahead = [r for r in rows if r.get("speculative") is not None]
            counted = counted_epochs({r["epoch"]: r for r in rows})
            if ahead and max(r["epoch"] for r in rows) > max(counted):  # lost at its rung
                rung = ahead[-1]["speculative"]
                assert max(counted) == rung and all(e <= rung for e in counted)
                assert ahead[-1]["speculative_rung_value"] == _loss(
                    {"quality": key[0], "model.latent_dim": key[1]}, rung)
                flagged.append(key)
    assert flagged  # the case happened


def test_work_ahead_resumes_from_trials_last_results():
    """Tune does not save schedulers: a restored sweep's scheduler is rebuilt from each
    trial's last result, also in the middle of working ahead."""
    sha = {k: _answer(v) for k, v in _simulate_ahead(POINTS, 0, False, 2).items()}
    restored_ahead = 0
    for seed in range(20):
        for crash_after in (10, 25, 40):
            trials = _simulate_ahead(POINTS, seed, True, 8, crash_after=crash_after)
            restored_ahead += sum(t.last_result.get("speculative") is not None for t in trials)
            for t in trials:  # as Tuner.restore leaves them: running ones start again
                t.status = "PENDING" if t.status == "RUNNING" else t.status
            got = _simulate_ahead(POINTS, seed + 100, True, 8, trials=trials)
            assert {k: _answer(v) for k, v in got.items()} == sha, (seed, crash_after)
    assert restored_ahead  # some trials were restored while trained ahead


# ---- real Ray Tune runs -----------------------------------------------------------------


def toy_trainable(config: dict, crash_marker: str | None = None) -> None:
    """Reports every epoch with a checkpoint that lists the epochs trained so far; resumes
    from ``tune.get_checkpoint()``."""
    from ray import tune

    trained = []
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            trained = json.loads((Path(d) / "state.json").read_text())["trained"]
    for epoch in range(len(trained) + 1, MAX_T + 1):
        if crash_marker and Path(crash_marker).exists():  # {"epoch": e, "point": [q, latent]}
            crash = json.loads(Path(crash_marker).read_text())
            point = [config["quality"], config["model.latent_dim"]]
            if epoch == crash["epoch"] and crash["point"] in (None, point):
                Path(crash_marker).unlink()
                raise RuntimeError("the driver goes down with this trial")
        trained.append(epoch)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"trained": trained}))
            tune.report({"epoch": epoch, "val_loss": _loss(config, epoch)},
                        checkpoint=tune.Checkpoint.from_directory(d))


@pytest.fixture(scope="module")
def ray_local():
    import os

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import cloudpickle

    # workers cannot import this test module: ship its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield
    if started:
        ray.shutdown()


def _fit(tmp_path, name, kind, stratify, seed=None, quality_order=QUALITIES,
         latent_first=False, max_concurrent=None, max_failures=0, work_ahead=False,
         counted=False, **kw):
    from ray import tune

    from cae.schedule.schedulers import speculation_marks

    scheduler = create_scheduler(kind, stratify, max_t=MAX_T, grace_period=1,
                               reduction_factor=3, work_ahead=work_ahead)
    space, search = _space(quality_order, latent_first), {}
    if seed is not None:
        s = shuffled_search(space, 1, seed)
        space, search = s.param_space, {"search_alg": s.search_alg, "num_samples": s.num_samples}
    tuner = tune.Tuner(
        tune.with_parameters(toy_trainable, crash_marker=kw.get("crash_marker")),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                    reuse_actors=True, max_concurrent_trials=max_concurrent,
                                    **search),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                  callbacks=[speculation_marks(scheduler)],
                                  failure_config=tune.FailureConfig(
                                      max_failures=max_failures,
                                      fail_fast="raise" if "crash_marker" in kw and not
                                      max_failures else False)),
    )
    results = tuner.fit()
    return _counted(results) if counted else _epochs(results)


def _counted(results) -> dict:
    """{(quality, latent): epochs that count}, as ``cae.results.tables`` counts them (epochs
    trained ahead of a rung the trial then lost there do not)."""
    import pandas as pd

    from cae.results.tables import counted_epochs

    _epochs(results)  # no epoch trained twice
    out = {}
    for r in results:
        df = r.metrics_dataframe
        flags = df["speculative"] if "speculative" in df else [None] * len(df)
        rows = {int(e): {"speculative": None if pd.isna(f) else f}
                for e, f in zip(df["epoch"], flags)}
        out[(r.config["quality"], r.config["model.latent_dim"])] = max(counted_epochs(rows))
    return out


def _epochs(results) -> dict:
    """{(quality, latent): epochs run}, checking that no epoch was trained twice. Read from
    each trial's last checkpoint: Ray Tune's result rows are copied into the run directory
    in the background, so after a driver crash they can lack epochs the trial trained."""
    out = {}
    for r in results:
        assert r.error is None
        with r.checkpoint.as_directory() as d:
            epochs = json.loads((Path(d) / "state.json").read_text())["trained"]
        assert epochs == list(range(1, len(epochs) + 1)), epochs
        assert r.metrics["epoch"] == epochs[-1]
        out[(r.config["quality"], r.config["model.latent_dim"])] = epochs[-1]
    return out


# stratified SHA: per latent, 4 trials -> 2 past rung 1 -> 1 past rung 3 -> to the end
SHA_STRATIFIED = {(0.1, 4): 9, (0.2, 4): 3, (0.3, 4): 1, (0.4, 4): 1,
                  (0.1, 8): 9, (0.2, 8): 3, (0.3, 8): 1, (0.4, 8): 1}


@pytest.mark.slow
def test_stratified_sha_in_two_shuffled_start_orders(ray_local, tmp_path):
    a = _fit(tmp_path, "sha-seed0", "sha", ["model.latent_dim"], seed=0)
    b = _fit(tmp_path, "sha-seed1", "sha", ["model.latent_dim"], seed=1)
    assert a == b == SHA_STRATIFIED
    assert sum(a.values()) == 28 < len(a) * MAX_T  # FIFO: 72 epochs


@pytest.mark.slow
def test_stratified_sha_working_ahead_decides_as_sha(ray_local, tmp_path):
    a = _fit(tmp_path, "ahead-seed0", "sha", ["model.latent_dim"], seed=0, work_ahead=True,
             counted=True)
    b = _fit(tmp_path, "ahead-seed1", "sha", ["model.latent_dim"], seed=1, work_ahead=True,
             counted=True)
    assert a == b == SHA_STRATIFIED


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:fail_fast='raise' detected")
def test_working_ahead_resumes_after_a_crash(ray_local, tmp_path, monkeypatch):
    from ray import tune

    from cae.schedule.schedulers import SpeculationMarks

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # save the experiment every step
    marker = tmp_path / "crash-marker"
    # the first trial to train a 2nd epoch: with 2 workers, while its stratum's rung 1
    # still waits for trials, i.e. trained ahead
    marker.write_text(json.dumps({"epoch": 2, "point": None}))
    with pytest.raises(Exception, match="the driver goes down"):
        _fit(tmp_path, "crash", "sha", ["model.latent_dim"], seed=0, work_ahead=True,
             crash_marker=str(marker))
    tuner = tune.Tuner.restore(str(tmp_path / "crash"), trainable=tune.with_parameters(
        toy_trainable, crash_marker=str(marker)), resume_unfinished=True, resume_errored=True)
    config = tuner._local_tuner.get_run_config()
    assert any(isinstance(c, SpeculationMarks) for c in config.callbacks)  # kept, as resume
    results = tuner.fit()
    assert len(results) == 8 and _counted(results) == SHA_STRATIFIED


@pytest.mark.slow
def test_sha_without_strata_trains_only_the_global_best(ray_local, tmp_path):
    # reversed grid order: the worst trials start first
    got = _fit(tmp_path, "sha-plain", "sha", [], quality_order=QUALITIES[::-1])
    # 8 trials -> 3 past rung 1 (all latent 4) -> 1 past rung 3
    assert got == {(0.1, 4): 9, (0.2, 4): 3, (0.3, 4): 3, (0.4, 4): 1,
                   (0.1, 8): 1, (0.2, 8): 1, (0.3, 8): 1, (0.4, 8): 1}


@pytest.mark.slow
def test_stratified_asha_trains_each_stratum_best_to_the_end(ray_local, tmp_path):
    # the two strata's bests start first (2 slots) and lead at every rung: they run to the
    # end; the others are stopped early (how early depends on when each reaches a rung:
    # ASHA is asynchronous)
    got = _fit(tmp_path, "asha-best-first", "asha", ["model.latent_dim"], latent_first=True)
    assert all(got[(0.1, lat)] == MAX_T for lat in LATENTS)
    assert all(e < MAX_T for (q, _), e in got.items() if q != 0.1)
    # worst first: ASHA lets early weak trials run on, but never stops a stratum's best
    got = _fit(tmp_path, "asha-worst-first", "asha", ["model.latent_dim"],
               quality_order=QUALITIES[::-1])
    assert all(got[(0.1, lat)] == MAX_T for lat in LATENTS)


@pytest.mark.slow
def test_sha_retries_a_crashed_trial_from_its_checkpoint(ray_local, tmp_path):
    # latent 4's winner crashes on its way to rung 3, where (0.2, 4) may already wait: the
    # rung waits for the retry instead of ranking the crashed trial by its epoch-2 value
    marker = tmp_path / "crash-marker"
    marker.write_text(json.dumps({"epoch": 3, "point": [0.1, 4]}))
    got = _fit(tmp_path, "retry", "sha", ["model.latent_dim"], seed=0, max_failures=1,
               crash_marker=str(marker))
    assert not marker.exists() and got == SHA_STRATIFIED


@pytest.mark.slow
def test_sha_under_a_concurrency_limit_fails_instead_of_waiting_forever(ray_local, tmp_path):
    # Ray counts paused trials against max_concurrent_trials: the rest are never created
    with pytest.raises(Exception, match="paused trials count against max_concurrent_trials"):
        _fit(tmp_path, "limited", "sha", ["model.latent_dim"], seed=0, max_concurrent=2)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:fail_fast='raise' detected")
@pytest.mark.parametrize("crash", [
    # the first trial to reach epoch 3: all trials exist; winners past rung 1, a rung-1
    # winner not restarted yet, losers (saved as still PAUSED: Ray does not re-save a
    # stopped paused trial), an undecided rung, a trial not started
    {"epoch": 3, "point": None},
    # the 3rd trial of seed 0's order, at once: most trials are still in the searcher
    {"epoch": 1, "point": [0.2, 8]},
])
def test_sha_with_shuffled_search_resumes_after_a_crash(ray_local, tmp_path, monkeypatch, crash):
    from ray import tune

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # save the experiment every step
    marker = tmp_path / "crash-marker"
    marker.write_text(json.dumps(crash))
    with pytest.raises(Exception, match="the driver goes down"):
        _fit(tmp_path, "crash", "sha", ["model.latent_dim"], seed=0, crash_marker=str(marker))
    assert not marker.exists()
    tuner = tune.Tuner.restore(str(tmp_path / "crash"), trainable=tune.with_parameters(
        toy_trainable, crash_marker=str(marker)), resume_unfinished=True, resume_errored=True)
    results = tuner.fit()
    assert len(results) == 8  # the searcher's state came back: no trial twice, none missing
    got = _epochs(results)  # no epoch trained twice
    # the same decisions; a trial restored while waiting at a rung is started by Ray and
    # may train one epoch past it before it pauses again (its rung value is kept)
    assert {k: v for k, v in got.items() if v == MAX_T} == {(0.1, 4): MAX_T, (0.1, 8): MAX_T}
    assert all(got[k] - SHA_STRATIFIED[k] in (0, 1) for k in got)


@pytest.mark.slow
def test_the_real_trainable_pauses_and_resumes_under_stratified_sha(ray_local, tmp_path):
    from ray import tune

    from cae.config.spec import load_spec
    from cae.sweep import plan, tuner

    spec = load_spec(str(Path(__file__).parents[1] / "sweeps" / "quickstart.yaml"), [
        "trial.max_epochs=3", "trial.data.train_limit=300", "trial.patience=null",
        "space.model.latent_dim={grid: [4, 16]}", "space.model.channels=[4, 8]"])
    checked = plan.check_spec(spec)
    search = shuffled_search(tuner.param_space(spec), spec.num_samples, seed=0)
    tuner = tune.Tuner(
        tuner.wrapped_trainable(spec, plan.load_datasets(checked), str(tmp_path / "real")),
        param_space=search.param_space,
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", search_alg=search.search_alg,
            num_samples=search.num_samples, reuse_actors=True,
            scheduler=create_scheduler("sha", ["model.latent_dim"], max_t=3, grace_period=1,
                                     reduction_factor=2)),
        run_config=tune.RunConfig(name="real", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 4  # latent 4 / 16 x convs 1 / 2
    # cae.results.tables, as `cae sweep` reads a run: Ray Tune's own result rows of a paused and
    # resumed trial can lack the epochs before the pause (its result.json is rewritten by
    # the driver); the epochs come back from the trial's checkpoints
    from cae.results.tables import load_frames
    from cae.run.directory import save_spec

    save_spec(str(tmp_path / "real"), spec)
    trials, epochs = load_frames(tmp_path / "real")
    assert len(trials) == 4 and not epochs.duplicated(["trial_id", "epoch"]).any()
    for latent in (4, 16):
        runs = trials[trials["model.latent_dim"] == latent].sort_values("epochs")
        assert runs["epochs"].tolist() == [1, 3]  # the loser stopped at the rung; resumed
        loser, winner = (epochs[epochs["trial_id"] == t] for t in runs["trial_id"])
        assert list(loser["epoch"]) == [1] and list(winner["epoch"]) == [1, 2, 3]
        assert winner["val_loss"].iloc[0] < loser["val_loss"].iloc[0]
        assert runs["stop_reason"].tolist() == ["sha", "max_epochs"]
        assert runs["test_loss"].isna().tolist() == [True, False]

def test_a_restored_trial_waiting_at_a_rung_stays_paused_until_chosen():
    """Tuner.restore re-adds a trial paused at an undecided rung as PENDING, and Tune starts
    PENDING trials without asking the scheduler: SHA files it as PAUSED again, so it does not
    train past the rung before the rung is decided."""
    from ray.tune.experiment import Trial

    sched = create_scheduler("sha", ["model.latent_dim"], max_t=6, grace_period=1,
                           reduction_factor=2)
    ctrl = _Controller(sched)
    waiting = Trial("fn", config={"model.latent_dim": 4, "q": 1}, trial_id="w", stub=True)
    waiting.run_metadata.last_result = {"epoch": 1, "val_loss": 0.5}
    behind = Trial("fn", config={"model.latent_dim": 4, "q": 2}, trial_id="b", stub=True)
    ctrl.search_alg = types.SimpleNamespace(is_finished=lambda: True)
    for trial in (waiting, behind):
        sched.on_trial_add(ctrl, trial)
    ctrl.get_trials = lambda: [waiting, behind]
    assert waiting.status == Trial.PAUSED and behind.status == Trial.PENDING
    assert sched.choose_trial_to_run(ctrl) is behind  # not the one waiting at rung 1

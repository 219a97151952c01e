"""Fused packs against separate runs: real small CAEs on the embedded sample, in float64 on
the CPU where rounding cannot hide a bug.

A member computes what its trial computes alone: each member sees its own batches (the
order and distortions of its own seed) and the dropout masks a plain ``Trainer`` draws
(``MaskedDropout``: a hash of the trial's seed, the layer and the step)."""

import io
import math

import pytest
import torch
from helpers import tiny_config

from cae.config.errors import UserError, validate
from cae.config.trial import TrialConfig
from cae.data.datasets import load
from cae.model.network import build_model
from cae.train.pack import Pack
from cae.train.packing import pack_key, plan_packs
from cae.train.stacked import MaskedDropout
from cae.train.trainer import Trainer

TOL = 1e-9  # relative, float64


def _cfg(**kw) -> TrialConfig:
    return tiny_config(**{"max_epochs": 3, **kw})


def _separate(cfg: TrialConfig) -> tuple[Trainer, list[dict]]:
    """A plain run of ``cfg``, unfused."""
    trainer = Trainer(cfg, load(cfg.data))
    states = []
    trainer.fit(lambda metrics, state: states.append(state()))
    return trainer, states


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _assert_close_states(got: dict, want: dict, tol: float = TOL) -> None:
    assert list(got) == list(want)  # the same keys, in the same order
    for key, value in want.items():
        assert _rel(got[key], value) <= tol, key


def test_pack_reproduces_separate_runs(float64):
    """Members differing in seed, learning rate, weight decay, dropout rate and stopping
    rule: each equals its separate run (losses every epoch, BatchNorm statistics, weights,
    Adam's moments, test errors), also after one member has left the pack."""
    cfgs = [_cfg(seed=0, model_dropout=0.2),
            _cfg(seed=1, lr=0.002, weight_decay=1e-3, model_dropout=0.4),
            _cfg(seed=2, lr=0.005, weight_decay=1e-2, model_dropout=0.1),
            # no improvement counts after epoch 1: patience stops it after epoch 2
            _cfg(seed=3, model_dropout=0.3, patience=1, min_delta=10.0)]
    pack = Pack(cfgs, load(cfgs[0].data))
    saved: dict[int, dict] = {}
    widths = []

    def on_epoch(metrics, _state):
        widths.append(len(pack.slots))
        for i in metrics:
            saved[i] = pack.member_state(i)

    reasons = pack.fit(on_epoch)
    assert reasons == {0: "max_epochs", 1: "max_epochs", 2: "max_epochs", 3: "patience"}
    assert widths == [4, 4, 3]  # member 3 left after epoch 2: the pack shrank
    for member in pack.members:
        trainer, states = _separate(member.cfg)
        assert len(member.history) == len(trainer.history) == saved[member.index]["epoch"]
        for got, want in zip(member.history, trainer.history):
            assert got["epoch"] == want["epoch"]
            for key in ("train_loss", "val_loss", "best_val_loss"):
                assert got[key] == pytest.approx(want[key], rel=TOL, abs=0), key
            assert got["best_epoch"] == want["best_epoch"]  # the tables take it as the own best
            assert set(got) == set(want)  # a member reports what a trial reports
        want, got = states[-1], saved[member.index]
        _assert_close_states(got["model"], want["model"])  # weights and BatchNorm statistics
        assert any("running_var" in k for k in got["model"])
        _assert_close_states(got["best_model"], want["best_model"])
        for k, s in want["optimizer"]["state"].items():
            g = got["optimizer"]["state"][k]
            assert float(g["step"]) == float(s["step"])
            assert _rel(g["exp_avg"], s["exp_avg"]) <= TOL
            assert _rel(g["exp_avg_sq"], s["exp_avg_sq"]) <= TOL
        assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
        test = trainer.test()
        assert set(member.test) == set(test)
        for key in test:
            assert member.test[key] == pytest.approx(test[key], rel=TOL)


@pytest.mark.slow
def test_different_losses_and_penalties_in_one_pack(float64):
    """Per-member loss and edge penalty; the activity penalty (``CAE.penalty`` computes it
    in float32, so its separate run rounds there) to a float32 tolerance."""
    cfgs = [_cfg(seed=0, loss="mse", model_edge_l2=1e-3), _cfg(seed=1, loss="l1"),
            _cfg(seed=2, loss="bce", model_activity_l1=1e-3),
            _cfg(seed=3, model_activity_l2=1e-2)]
    pack = Pack(cfgs, load(cfgs[0].data), evaluate_test=False)
    pack.fit()
    for member, tol in zip(pack.members, (TOL, TOL, 1e-5, 1e-5)):
        trainer, _ = _separate(member.cfg)
        for got, want in zip(member.history, trainer.history, strict=True):
            assert got["val_loss"] == pytest.approx(want["val_loss"], rel=tol)


@pytest.mark.slow
def test_denoise_groups_and_colorize_rgb_match(float64):
    for task, dataset in (("denoise", "sample"), ("colorize", "photos")):
        kw = {"task": {"name": task}, "max_epochs": 1}
        if dataset == "photos":
            kw["data"] = {"dataset": "photos", "train_limit": 120, "test_limit": 40}
        cfgs = [_cfg(seed=0, **kw), _cfg(seed=5, lr=0.001, **kw)]
        pack = Pack(cfgs, load(cfgs[0].data))
        pack.fit()
        for member in pack.members:
            trainer, _ = _separate(member.cfg)
            want, got = trainer.history[-1], member.history[-1]
            extra = [k for k in want if k.startswith("val_")]
            assert len(extra) > 1 and set(extra) <= set(got)
            for key in extra:
                assert got[key] == pytest.approx(want[key], rel=TOL), (task, key)
            test = trainer.test()
            for key in test:
                assert member.test[key] == pytest.approx(test[key], rel=TOL), (task, key)


def test_member_checkpoint_loads_into_a_plain_cae_and_adam(float64):
    cfgs = [_cfg(seed=0, max_epochs=2), _cfg(seed=1, lr=0.001, max_epochs=2)]
    pack = Pack(cfgs, load(cfgs[0].data))
    x = pack.val[0][:16].double()
    states, outputs = {}, {}

    def on_epoch(metrics, _state):
        states.update({i: pack.member_state(i) for i in metrics})
        pack.stack.eval()
        with torch.no_grad():
            outputs.update({i: pack.forward(x)[1][pack.slots.index(i)] for i in metrics})

    pack.fit(on_epoch)
    for i, cfg in enumerate(cfgs):
        state = torch.load(_roundtrip(states[i]), weights_only=True)
        model = build_model(cfg.model, seed=cfg.seed)
        model.load_state_dict(state["model"])  # strict: the same keys as a plain CAE
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), outputs[i], rtol=TOL, atol=0)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.load_state_dict(state["optimizer"])
        trainer = Trainer(cfg, load(cfg.data))
        trainer.load_state_dict(state)  # a plain trainer takes it as its own checkpoint
        assert trainer.epoch == 2 and trainer.best_epoch == state["best_epoch"]


def _roundtrip(state: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("compile_", ["none", pytest.param("default", marks=pytest.mark.slow)])
def test_pack_killed_and_resumed_equals_uninterrupted(compile_, monkeypatch):
    """Killed after epoch 2 (one member leaving then), resumed from its members' checkpoints:
    every later epoch, weight and stop equal the uninterrupted pack's. Compiled, the stack
    is traced by dynamo and AOTAutograd (``aot_eager``: inductor's code generation would take
    minutes on two cores; what it generates is checked on a GPU by benchmarks/gpu.py)."""
    if compile_ != "none":
        import cae.train.pack

        monkeypatch.setattr(cae.train.pack, "compiler", lambda mode: lambda m: torch.compile(
            m, backend="aot_eager", dynamic=False))
    cfgs = [_cfg(seed=0, max_epochs=4, compile=compile_, model_dropout=0.2),
            _cfg(seed=1, max_epochs=4, lr=0.002, compile=compile_, model_dropout=0.2),
            _cfg(seed=2, max_epochs=4, patience=1, min_delta=10.0, compile=compile_,
                 model_dropout=0.2)]
    data = load(cfgs[0].data)
    whole = Pack(cfgs, data)
    whole.fit()

    class Killed(Exception):
        pass

    saved = {}

    def kill_after_two(metrics, states):
        saved.update({i: torch.load(_roundtrip(s), weights_only=True)
                      for i, s in states().items()})
        if next(iter(metrics.values()))["epoch"] == 2:
            raise Killed

    first = Pack(cfgs, data)
    with pytest.raises(Killed):
        first.fit(kill_after_two)
    resumed = Pack(cfgs, data)
    # the members' own checkpoints, and the rows as they were (a compiled pack keeps an
    # empty one until half are empty)
    resumed.load_members([saved[i] for i in range(3)], slots=saved[0]["pack"]["slots"])
    resumed.fit()
    for a, b in zip(whole.members, resumed.members):
        assert a.stop_reason == b.stop_reason
        assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
        assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
        assert a.test == b.test
        for key, value in a.best_state.items():
            assert torch.equal(value, b.best_state[key]), key
    assert torch.equal(whole.stack.flat, resumed.stack.flat)


@pytest.mark.slow
def test_a_diverging_member_leaves_and_the_others_go_on():
    cfgs = [_cfg(seed=0), _cfg(seed=1), _cfg(seed=2)]
    data = load(cfgs[0].data)
    clean = Pack(cfgs, data)
    clean.fit()
    pack = Pack(cfgs, data)

    def poison(metrics, _state):
        if next(iter(metrics.values()))["epoch"] == 1:
            with torch.no_grad():
                pack.stack.flat[1] = math.nan

    reasons = pack.fit(poison)
    assert reasons == {0: "max_epochs", 1: "diverged", 2: "max_epochs"}
    assert "train loss became nan at epoch 2" in pack.members[1].error
    assert pack.members[1].test == {}
    for i in (0, 2):
        assert [h["val_loss"] for h in pack.members[i].history] == pytest.approx(
            [h["val_loss"] for h in clean.members[i].history], rel=1e-6)


def test_masked_dropout_rates_streams_and_eval():
    x = torch.ones(64, 8, 16, 16)
    a, b = MaskedDropout(0.3, seed=7, layer=2), MaskedDropout(0.3, seed=7, layer=2)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)  # same seed, layer and step: same mask
    assert not torch.equal(a(x), ya)  # the next step draws a new mask
    assert not torch.equal(MaskedDropout(0.3, seed=8, layer=2)(x), ya)
    assert not torch.equal(MaskedDropout(0.3, seed=7, layer=3)(x), ya)
    dropped = float((ya == 0).double().mean())
    assert abs(dropped - 0.3) < 0.01
    assert torch.allclose(ya[ya != 0], torch.full_like(ya[ya != 0], 1 / 0.7))
    a.eval()
    assert torch.equal(a(x), x)
    assert "step" not in a.state_dict() and a.state_dict() == {}


def _int64_masked_dropout(x, rate: float, seed: int, layer: int, step: int):
    """The masks as first defined: the whole hash in int64, the rate compared in float32
    (every run with dropout since 2026-12-06 drew these)."""
    from cae.train.stacked import _M32, _mix32

    seed_t, step_t = torch.tensor(seed), torch.tensor(step)
    key = _mix32(_mix32((seed_t & _M32) ^ _mix32((seed_t >> 32) & _M32)) ^ layer)
    key = _mix32(key ^ (step_t & _M32))
    index = torch.arange(x.numel()).view(x.shape)
    bits = _mix32(_mix32((index + key) & _M32) ^ key) >> 8
    rate_t = torch.tensor(float(rate))
    return x * ((bits.to(torch.float32) * 2.0**-24 >= rate_t) / (1 - rate_t)).to(x.dtype)


@pytest.mark.parametrize("seed", [0, 12345, 2**31, 2**32 + 7, 10**12 + 3])
def test_masked_dropout_draws_the_masks_of_the_int64_hash_bit_for_bit(seed):
    """The int32 hash, with what depends on the seed and the rate hashed at construction,
    draws exactly the masks of the int64 hash (runs made with those resume bit for bit), in
    either memory layout."""
    for rate in (0.1, 0.33, 0.5, 0.9):
        for shape in ((64, 4, 14, 14), (3, 5), (1000,)):
            layer = MaskedDropout(rate, seed, 1003)
            for step in (0, 1, 2**31 + 5):
                layer.step.fill_(step)
                x = torch.rand(shape, dtype=torch.float64)
                want = _int64_masked_dropout(x, rate, seed, 1003, step)
                assert torch.equal(layer(x), want), (rate, shape, step)
    x = torch.rand(8, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    layer = MaskedDropout(0.2, seed, 3)
    layer.channels_last = True
    got = layer(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, _int64_masked_dropout(x, 0.2, seed, 3, 0))


def test_which_trials_fuse():
    cfgs = [_cfg(seed=0), _cfg(seed=1, lr=0.01, weight_decay=0.1, loss="l1"),
            _cfg(model_channels=[4, 4]), _cfg(batch_size=16), _cfg(model_dropout=0.1),
            _cfg(model_dropout=0.3, seed=9), _cfg(task={"name": "denoise"})]
    assert pack_key(cfgs[0]) == pack_key(cfgs[1])
    assert pack_key(cfgs[4]) == pack_key(cfgs[5])  # rates differ, layers do not
    assert plan_packs(cfgs, 8) == [[0, 1], [2], [3], [4, 5], [6]]
    many = [_cfg(seed=s) for s in range(10)]
    assert [len(p) for p in plan_packs(many, 8)] == [5, 5]
    assert [len(p) for p in plan_packs(many, 3)] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="cannot fuse"):
        Pack([cfgs[0], cfgs[2]])


def test_compile_modes_and_old_booleans():
    assert TrialConfig.model_validate({"compile": True}).compile == "default"
    assert TrialConfig.model_validate({"compile": False}).compile == "none"
    assert TrialConfig.model_validate({}).compile == "none"
    assert TrialConfig.model_validate({"compile": "reduce-overhead"}).compile == "reduce-overhead"
    with pytest.raises(UserError, match="compile"):
        validate(TrialConfig, {"compile": "max-autotune"})


@pytest.mark.parametrize("task", ["reconstruct", "denoise"])
def test_a_packs_batches_are_each_members_own_also_when_gathered_at_once(task):
    """A reconstructing pack takes every member's batch in one (K, B) gather (nothing is
    drawn for it); the batches are exactly those each member's own order gives, one by one
    through its task, also for an empty slot (a copy of the first member's). A denoising
    pack keeps the member-by-member path (each draws its own distortions): its batches'
    shapes."""
    from cae.train.loop import batch_order

    cfgs = [_cfg(seed=s, task={"name": task}, batch_size=48) for s in (0, 3, 11)]
    pack = Pack(cfgs, load(cfgs[0].data))
    pack.slots[1] = None  # a member that left: its slot trains a copy of the first's
    got = list(pack._batches())
    train, n = pack.splits.train, pack.splits.train.shape[0]
    gens = {i: torch.Generator().manual_seed(0) for i in (0, 2)}
    perms = {i: batch_order(gens[i], cfgs[i].seed, pack.epoch, n) for i in (0, 2)}
    assert len(got) == math.ceil(n / 48)
    for step, (x, y, size) in enumerate(got):
        start = step * 48
        rows = []
        for i in (0, 0, 2):  # slot 1 copies the first live member
            idx = perms[i][start:start + 48]
            rows.append(pack.task.batch(train[idx], idx, gens[i])[:2])
        if task == "reconstruct":  # nothing drawn: comparable row by row
            assert torch.equal(x, torch.stack([r[0] for r in rows]))
            assert torch.equal(y, torch.stack([r[1] for r in rows]))
        assert x.shape[:2] == (3, size) and size == min(48, n - start)

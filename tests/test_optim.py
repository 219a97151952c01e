"""Optimisers, learning-rate schedules and clipping as trial settings: validated before
anything runs, recorded per epoch, resumed in the middle of a schedule to the same losses,
and the same in a fused pack as in separate trials (float64, where rounding hides nothing)."""

import io
import math

import pytest
import torch
from helpers import tiny_config
from pydantic import ValidationError

from cae.config.trial import TrialConfig
from cae.data.datasets import load
from cae.train.optimizers import BatchedOptimizer, make_optimizer, member_settings
from cae.train.pack import Pack
from cae.train.trainer import Trainer, train

TOL = 1e-9
# Weights and optimiser state: a conv bias followed by BatchNorm has no gradient but
# rounding noise, which Adam normalises into steps; the losses are what must agree to TOL.
TOL_STATE = 1e-6


def _cfg(**kw) -> TrialConfig:
    return tiny_config(**{"max_epochs": 4, **kw})


# ---- settings ------------------------------------------------------------------------------


def test_the_defaults_are_adam_at_a_constant_rate():
    cfg = _cfg()
    assert (cfg.optimizer.name, cfg.schedule.name, cfg.grad_clip) == ("adam", "constant", None)
    opt = make_optimizer([torch.zeros(1, requires_grad=True)], cfg)
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0.0


@pytest.mark.parametrize("change,field", [
    ({"schedule": {"name": "cosine", "warmup_epochs": 4}}, "schedule.warmup_epochs"),
    ({"schedule": {"name": "onecycle", "warmup_epochs": 1}}, "schedule.warmup_epochs"),
    ({"optimizer": {"name": "sgd", "nesterov": True}}, "optimizer.nesterov"),
    ({"optimizer": {"name": "adam", "betas": [0.9, 1.5]}}, "optimizer.betas"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name"),
    ({"schedule": {"name": "cosine", "min_lr_ratio": 2}}, "schedule.min_lr_ratio"),
    ({"grad_clip": 0}, "grad_clip"),
])
def test_impossible_settings_are_refused_naming_the_field(change, field):
    with pytest.raises(ValidationError) as info:
        _cfg(**change)
    assert field.split(".")[-1] in str(info.value)


# ---- a trial alone -------------------------------------------------------------------------


def _lrs(**kw) -> list[float]:
    return [h["lr"] for h in train(_cfg(**kw), evaluate_test=False).history]


def test_each_schedule_is_recorded_per_epoch():
    assert _lrs() == [0.003] * 4
    cosine = _lrs(schedule={"name": "cosine", "min_lr_ratio": 0.1})
    assert cosine[0] == pytest.approx(0.003) and all(a > b for a, b in zip(cosine, cosine[1:]))
    assert cosine[-1] > 0.0003  # the last epoch trains above the floor it ends on
    warm = _lrs(schedule={"name": "cosine", "warmup_epochs": 2})
    assert warm[:3] == pytest.approx([0.001, 0.002, 0.003])
    assert _lrs(schedule={"name": "step", "step_size": 2, "gamma": 0.5}) == pytest.approx(
        [0.003, 0.003, 0.0015, 0.0015])
    one = _lrs(schedule={"name": "onecycle", "pct_start": 0.5})
    assert max(one) <= 0.003 and one.index(max(one)) in (1, 2) and one[-1] < one[0]
    # no epoch after the first improves by 10: the rate halves after each of them
    flat = _lrs(schedule={"name": "plateau", "plateau_patience": 0, "gamma": 0.5},
                min_delta=10.0)
    assert flat == pytest.approx([0.003, 0.003, 0.0015, 0.00075])


@pytest.mark.parametrize("schedule", [
    {"name": "cosine", "warmup_epochs": 1}, {"name": "onecycle"},
    {"name": "step", "step_size": 1, "gamma": 0.5, "warmup_epochs": 1},
    # with min_delta 0.01 the plateau halves the rate after epochs 2 and 3
    {"name": "plateau", "plateau_patience": 0, "gamma": 0.5}])
def test_a_trial_killed_mid_schedule_resumes_to_the_same_losses(schedule):
    """Stopped after epoch 2 of 4 and resumed from a saved-and-loaded checkpoint, as a
    restarted Ray trial is: every epoch's losses and rates equal the uninterrupted run's
    (a plateau schedule's count of epochs without a better loss included)."""
    kw = {"schedule": schedule, "optimizer": {"name": "adamw"}, "weight_decay": 0.01,
          "grad_clip": 0.5, "min_delta": 0.01 if schedule["name"] == "plateau" else 0.0}
    whole = train(_cfg(**kw), evaluate_test=False).history
    buf = io.BytesIO()
    Trainer(_cfg(**kw)).fit(lambda m, s: torch.save(s(), buf) if m["epoch"] == 2 else None)
    buf.seek(0)
    resumed = train(_cfg(**kw), resume=torch.load(buf, weights_only=True),
                    evaluate_test=False).history
    for key in ("train_loss", "val_loss", "lr"):
        assert [h[key] for h in resumed] == [h[key] for h in whole], key
    rates = [h["lr"] for h in whole]  # the schedule acts after the resume point
    assert rates[1] != rates[2] != rates[3], rates


def test_clipping_changes_the_steps():
    a = train(_cfg(), evaluate_test=False).history
    b = train(_cfg(grad_clip=1e-3), evaluate_test=False).history
    assert a[-1]["train_loss"] != b[-1]["train_loss"]


# ---- the batched optimiser against torch's -------------------------------------------------


@pytest.mark.parametrize("name,opt", [
    ("adam", {}), ("adamw", {"betas": [0.8, 0.99], "eps": 1e-6}),
    ("sgd", {"momentum": 0.9, "nesterov": True}), ("sgd", {"momentum": 0.0})])
def test_the_batched_optimiser_steps_as_torch_does(float64, name, opt):
    torch.manual_seed(0)
    cfgs = [_cfg(optimizer={"name": name, **opt}, lr=lr, weight_decay=wd, grad_clip=clip)
            for lr, wd, clip in ((0.01, 0.0, None), (0.003, 0.1, 0.05), (0.02, 0.01, 1.0))]
    start = torch.randn(3, 7)
    flat = start.clone()
    batched = BatchedOptimizer(name, flat)
    batched.set(member_settings(cfgs, [c.lr for c in cfgs], flat.device),
                clipping=True)
    singles = [torch.nn.Parameter(start[k].clone()) for k in range(3)]
    opts = [make_optimizer([p], c) for p, c in zip(singles, cfgs)]
    for _ in range(5):
        grads = torch.randn(3, 7)
        batched.step(flat, grads.clone())
        for k, (p, o, c) in enumerate(zip(singles, opts, cfgs)):
            p.grad = grads[k].clone()
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_([p], c.grad_clip)
            o.step()
    for k in range(3):
        assert torch.allclose(flat[k], singles[k].detach(), rtol=TOL, atol=0), k


# ---- packs ---------------------------------------------------------------------------------


def _separate(cfg: TrialConfig) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(cfg, load(cfg.data))
    states = []
    trainer.fit(lambda metrics, state: states.append(state()))
    return trainer, states


@pytest.mark.parametrize("name,extra", [
    ("adamw", [{"schedule": {"name": "cosine", "warmup_epochs": 1}, "grad_clip": 0.5},
               {"schedule": {"name": "onecycle", "pct_start": 0.4}, "lr": 0.005},
               {"schedule": {"name": "step", "step_size": 2}, "weight_decay": 0.05},
               {"schedule": {"name": "plateau", "plateau_patience": 0}, "min_delta": 10.0}]),
    ("sgd", [{"optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True}, "lr": 0.05,
              "schedule": {"name": "cosine"}},
             {"optimizer": {"name": "sgd"}, "lr": 0.1, "schedule": {"name": "onecycle"},
              "grad_clip": 0.2},
             {"optimizer": {"name": "sgd", "momentum": 0.5}, "lr": 0.02,
              "weight_decay": 0.01}]),
])
def test_pack_members_equal_separate_trials_under_each_optimiser(float64, name, extra):
    """Members of one optimiser with different rates, schedules, momentum, weight decay and
    clipping: each equals its trial alone (losses, rates, weights, optimiser state)."""
    cfgs = [_cfg(seed=i, optimizer={"name": name}, **kw) if "optimizer" not in kw
            else _cfg(seed=i, **kw) for i, kw in enumerate(extra)]
    pack = Pack(cfgs, load(cfgs[0].data))
    saved: dict[int, dict] = {}
    pack.fit(lambda metrics, _state: saved.update({i: pack.member_state(i) for i in metrics}))
    for member in pack.members:
        trainer, states = _separate(member.cfg)
        assert len(member.history) == len(trainer.history)
        for got, want in zip(member.history, trainer.history):
            for key in ("train_loss", "val_loss", "lr"):
                assert got[key] == pytest.approx(want[key], rel=TOL, abs=0), (member.index, key)
        got, want = saved[member.index], states[-1]
        for key, value in want["model"].items():
            assert torch.allclose(got["model"][key], value, rtol=TOL_STATE, atol=1e-12), (
                member.index, key, float((got["model"][key] - value).abs().max()))
        assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
        for k, s in want["optimizer"]["state"].items():
            for buffer, value in s.items():
                assert torch.allclose(got["optimizer"]["state"][k][buffer].double(),
                                      value.double(), rtol=TOL_STATE, atol=1e-12), buffer
        assert got["schedule"] == want["schedule"]


def test_a_pack_refuses_members_of_different_optimisers_in_one_line():
    cfgs = [_cfg(), _cfg(optimizer={"name": "sgd"})]
    with pytest.raises(ValueError, match=r"optimizer\.name: adam, sgd") as info:
        Pack(cfgs, load(cfgs[0].data))
    assert "\n" not in str(info.value)


def test_a_member_checkpoint_resumes_its_schedule_in_a_plain_trial(float64):
    cfg = _cfg(schedule={"name": "cosine"}, optimizer={"name": "adamw"}, max_epochs=4)
    pack = Pack([cfg, _cfg(seed=1, schedule={"name": "cosine"}, optimizer={"name": "adamw"})],
                load(cfg.data))
    buf = io.BytesIO()
    pack.fit(lambda metrics, _s: torch.save(pack.member_state(0), buf)
             if metrics[0]["epoch"] == 2 else None)
    buf.seek(0)
    trainer = Trainer(cfg, load(cfg.data))
    trainer.load_state_dict(torch.load(buf, weights_only=True))
    trainer.fit()
    assert [h["lr"] for h in trainer.history] == pytest.approx(
        [h["lr"] for h in pack.members[0].history], rel=TOL)
    assert math.isclose(trainer.history[-1]["val_loss"],
                        pack.members[0].history[-1]["val_loss"], rel_tol=1e-9)


def test_the_dry_run_says_when_a_plateau_schedule_may_never_act(capsys):
    from pathlib import Path

    from cae.cli import main

    quickstart = str(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml")
    assert main(["sweep", quickstart, "--dry-run", "--set", "trial.schedule.name=plateau"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    assert any("patience (3)" in n and "may never act" in n for n in notes)
    assert any("scheduler.grace_period" in n for n in notes)
    assert main(["sweep", quickstart, "--dry-run", "--set", "trial.schedule.name=cosine"]) == 0
    assert "may never act" not in capsys.readouterr().out


def test_the_loss_figure_shows_scheduled_rates_on_a_second_axis():
    import pandas as pd

    from cae.report.curves import loss_evolution

    trials = pd.DataFrame({"trial_id": ["a", "b"], "best_val_loss": [0.1, 0.2],
                           "stop_reason": ["max_epochs"] * 2, "status": ["TERMINATED"] * 2,
                           "epochs": [3, 3]})
    epochs = pd.DataFrame({"trial_id": ["a"] * 3 + ["b"] * 3, "epoch": [1, 2, 3] * 2,
                           "val_loss": [0.3, 0.2, 0.1, 0.4, 0.3, 0.2],
                           "train_loss": [0.3, 0.2, 0.1, 0.4, 0.3, 0.2],
                           "lr": [0.01, 0.005, 0.001, 0.01, 0.01, 0.01]})
    rates = [t for t in loss_evolution(trials, epochs).data if t.name.endswith("learning rate")]
    assert [list(t.y) for t in rates] == [[0.01, 0.005, 0.001], [0.01] * 3]
    assert {t.yaxis for t in rates} == {"y3"}  # the training panel's second axis
    epochs["lr"] = 0.01  # constant rates: nothing to show
    assert not [t for t in loss_evolution(trials, epochs).data if "learning rate" in t.name]


def test_a_configuration_keeps_its_id_when_the_new_settings_are_at_their_defaults():
    """config_id of a trial at Adam/constant/no clipping is the id it had before these
    settings existed (the hash of its settings without them); away from the defaults they
    count."""
    import hashlib
    import json

    from cae.run.record import config_id

    dump = _cfg().model_dump(mode="json")
    legacy = {k: v for k, v in dump.items()
              if k not in ("seed", "optimizer", "schedule", "grad_clip")}
    assert config_id(dump) == hashlib.sha1(
        json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:10]
    assert config_id(_cfg(schedule={"name": "cosine"}).model_dump(mode="json")) \
        != config_id(dump)
    assert config_id(_cfg(grad_clip=1.0).model_dump(mode="json")) != config_id(dump)

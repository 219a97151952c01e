"""Real short training runs on the embedded sample and on real RGB photographs."""

import math

import numpy as np
import pytest
import torch

from cae.config.trial import TrialConfig
from cae.data.datasets import load
from cae.train.hardware import autocast
from cae.train.loop import Diverged
from cae.train.trainer import Trainer, train


def _cfg(**kw) -> TrialConfig:
    base = {"data": {"dataset": "sample", "train_limit": 1600}, "lr": 0.005, "batch_size": 32,
            "max_epochs": 3, "patience": None,
            "model": {"channels": [4, 8], "dense": [32], "latent_dim": 8}}
    base.update(kw)
    return TrialConfig.model_validate(base)


def test_reconstruct_val_loss_falls_and_test_is_evaluated():
    seen = []
    result = train(_cfg(), on_epoch=lambda m, state: seen.append((m, state())))
    losses = [m["val_loss"] for m, _ in seen]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8
    assert result.stop_reason == "max_epochs" and "stop_reason" in seen[-1][0]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert 0 < result.test["test_loss"] < losses[0]
    state = seen[-1][1]
    assert state["epoch"] == 3 and set(state) >= {"model", "optimizer", "best_model"}


def test_seeded_runs_are_identical_and_resume_continues():
    a = train(_cfg(max_epochs=2), evaluate_test=False)
    b = train(_cfg(max_epochs=2), evaluate_test=False)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    states = []
    train(_cfg(max_epochs=1), on_epoch=lambda m, s: states.append(s()), evaluate_test=False)
    resumed = train(_cfg(max_epochs=2), resume=states[-1], evaluate_test=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[1]["val_loss"] == pytest.approx(a.history[1]["val_loss"], rel=1e-5)


def test_patience_stops_early():
    result = train(_cfg(max_epochs=30, patience=1, lr=0.5), evaluate_test=False)
    assert result.stop_reason in ("patience",) and len(result.history) < 30


def test_denoise_reports_each_distortion():
    result = train(_cfg(task={"name": "denoise"}, max_epochs=2))
    last = result.history[-1]
    for name in ("noise", "rotate", "flip", "patch", "brightness"):
        assert last[f"val_loss_{name}"] > 0 and result.test[f"test_loss_{name}"] > 0
    mean = np.mean([last[f"val_loss_{n}"] for n in ("noise", "rotate", "flip", "patch",
                                                    "brightness")])
    assert last["val_loss"] == pytest.approx(mean, rel=0.05)  # balanced groups


def test_divergence_ends_the_trial_with_the_reason():
    """The loop lets a diverging trial leave (``stop_reason`` diverged, the reason kept, no
    test); ``train``, which promises a trained model, raises."""
    cfg = _cfg(lr=1e12, model={"channels": [4, 8], "latent_dim": 8,
                                "output_activation": "linear"})
    trainer = Trainer(cfg)
    seen = []
    assert trainer.fit(lambda m, s: seen.append((m, s())), evaluate_test=True) == "diverged"
    assert "loss became" in trainer.member.error and trainer.member.test == {}
    assert seen[-1][0]["stop_reason"] == "diverged"
    assert seen[-1][1]["error"] == trainer.member.error  # the checkpoint keeps the reason
    with pytest.raises(Diverged, match="loss became (nan|inf)"):
        train(cfg, evaluate_test=False)


def test_colorize_on_real_photographs():
    cfg = TrialConfig.model_validate({
        "data": {"dataset": "photos", "train_limit": 1200}, "task": {"name": "colorize"},
        "model": {"preset": "study_a_colorize"}, "lr": 0.003, "batch_size": 64,
        "max_epochs": 3, "patience": None,
    })
    trainer = Trainer(cfg, load(cfg.data))
    assert trainer.model.cfg.in_channels == 1 and trainer.model.cfg.out_channels == 2
    trainer.fit()
    first, last = trainer.history[0], trainer.history[-1]
    assert last["val_loss"] < first["val_loss"]
    assert 0 < last["val_rgb_mse"] < 0.1 and math.isfinite(last["val_rgb_mse"])
    test = trainer.test()
    assert test["test_rgb_mse"] > 0 and test["test_loss"] > 0


def _clone(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def test_a_resumed_run_with_dropout_reproduces_the_uninterrupted_one():
    """Dropout masks and distortions come from the trial's seed and epoch, never from the
    global random state (which the checkpoint does not carry), so a run interrupted after
    epoch 2 and resumed from a saved-and-loaded checkpoint in a process whose global state
    moved on (as a restarted Ray trial would) gives the very losses of the uninterrupted
    run."""
    import io

    kw = {"max_epochs": 4, "model": {"channels": [4, 8], "dense": [32], "latent_dim": 8,
                                     "dropout": 0.3, "dense_dropout": 0.2}}
    whole = train(_cfg(**kw), evaluate_test=False)
    states = []
    train(_cfg(**{**kw, "max_epochs": 2}), on_epoch=lambda m, s: states.append(s()),
          evaluate_test=False)
    buf = io.BytesIO()
    torch.save(states[-1], buf)
    buf.seek(0)
    torch.manual_seed(12345)  # another trial ran in this process meanwhile
    torch.rand(100)
    resumed = train(_cfg(**kw), resume=torch.load(buf, weights_only=True), evaluate_test=False)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]


def test_test_evaluation_leaves_the_last_weights_in_the_model():
    """The last checkpoint of a trial is saved after its test evaluation: ``model`` must
    still hold the last epoch's weights, ``best_model`` the best epoch's."""
    trainer = Trainer(_cfg(max_epochs=2))
    states = []
    trainer.fit(lambda m, s: states.append(_clone(s()["model"])))
    trainer.best_state = states[0]  # make the best epoch differ from the last
    last = _clone(trainer.model.state_dict())
    test = trainer.test()
    after = trainer.state_dict()
    assert all(torch.equal(after["model"][k], last[k]) for k in last)
    assert any(not torch.equal(after["best_model"][k], last[k]) for k in last)
    assert math.isfinite(test["test_loss"])


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_trains():
    from cae.train.hardware import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # bf16 moved single trials by up to 13%
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    assert isinstance(native_bf16(cpu), bool)
    with pytest.raises(ValueError, match="precision"):
        _cfg(precision="fp16")
    trainer = Trainer(_cfg(precision="bf16", max_epochs=2))
    assert trainer.precision == "bf16"
    with autocast(trainer.precision, trainer.device):
        z = trainer.enc(trainer._inputs(trainer.splits.train[:4].float() / 255))
    assert z.dtype == torch.bfloat16  # the forward pass runs in bf16 ...
    trainer.fit()
    losses = [h["val_loss"] for h in trainer.history]
    assert losses[1] < losses[0]  # ... and it learns
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights fp32


def test_errors_are_measured_in_fp32_whatever_the_training_precision():
    """The same weights give the same validation error under bf16 and fp32 training
    settings: every trial (and the baselines) is measured alike."""
    a, b = Trainer(_cfg(precision="fp32")), Trainer(_cfg(precision="bf16"))
    b.model.load_state_dict(a.model.state_dict())
    assert a.evaluate(a.val) == b.evaluate(b.val)

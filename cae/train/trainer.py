"""One trial in plain PyTorch: the runner of one member for the one training loop.

No Ray here. ``Trainer`` holds the model, optimiser, data and task of a trial and trains its
epochs; ``cae.train.loop.fit`` runs them (the same loop a pack's members run in), and
``Trainer.fit(on_epoch)`` calls ``on_epoch(metrics, checkpoint)`` after every epoch, which is
how ``cae train`` prints its lines; ``load_state_dict`` continues from such a checkpoint.
Dropout is :class:`~cae.train.stacked.MaskedDropout` as in a pack, so a trial computes the
same losses fused or not. The data stay on the device as uint8; batches are indexed,
converted and distorted there; losses are summed on the device and read once per epoch, so
there is no host synchronisation per step.

Unlike a pack, a trial runs its convolutions in ``channels_last``: faster for plain convs
on CUDA and on the CPU (oneDNN), while a pack's convolutions are grouped under ``vmap``,
whose stacked (K, B, C, H, W) inputs have no such layout. The layout changes no loss
beyond rounding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cae.config.trial import TrialConfig
from cae.data.datasets import ImageData, load, split, to_device
from cae.model.network import CAE, build_model, count_params
from cae.train import loop
from cae.train.hardware import autocast, compiler, mark_step, resolve_device, resolve_precision
from cae.train.loop import (
    Diverged,
    Member,
    Stopping,
    batch_order,
    evaluate,
    per_sample_loss,
    trial_checkpoint,
)
from cae.train.optimizers import Schedule, make_optimizer
from cae.train.stacked import masks_channels_last, set_dropout_step, use_masked_dropout
from cae.train.tasks import make_task


@dataclass
class TrainResult:
    """What a finished run leaves: per-epoch history, the best epoch, the test errors."""

    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    stop_reason: str = ""
    test: dict = field(default_factory=dict)
    params: int = 0
    latent_size: int = 0
    model: CAE | None = None  # with the last epoch's weights
    best_state: dict | None = None  # the best epoch's weights (a state dict)


class Trainer:
    """Holds the model, optimiser, data and task of one trial (``members[0]``); ``fit`` runs
    the epochs (``cae.train.loop.fit``).

    The batches' order and random distortions follow the trial's seed
    (``cae.train.loop.batch_order``), as they do for the same trial in a pack."""

    def __init__(self, cfg: TrialConfig, data: ImageData | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        data = data if data is not None else load(cfg.data)
        splits = split(data, cfg.data.val_fraction, cfg.data.split_seed)
        self.splits = to_device(splits, self.device)
        self.task = make_task(cfg.task)
        model = use_masked_dropout(build_model(cfg.model, seed=cfg.seed).to(self.device),
                                   cfg.seed)
        self.cuda = self.device.type == "cuda"
        self.model = masks_channels_last(model.to(memory_format=torch.channels_last))
        self.dtype = next(self.model.parameters()).dtype  # float64 only in exactness tests
        # Encoder and decoder are compiled separately so the latent stays reachable for
        # the activity penalty.
        wrap = compiler(cfg.compile)
        self.enc, self.dec = wrap(self.model.encoder), wrap(self.model.decoder)
        self.steps_per_epoch = math.ceil(self.splits.train.shape[0] / cfg.batch_size)
        self.opt = make_optimizer(self.model.parameters(), cfg)
        self.members = [Member(0, cfg, Schedule(self.opt, cfg, self.steps_per_epoch),
                               torch.Generator(device=self.device), Stopping.of(cfg))]
        # The validation inputs are prepared once, identically for every trial and epoch.
        self.val = self.task.eval_inputs(self.splits.val, seed=cfg.task.eval_seed)
        self.epoch = 0

    # ---- the trial's state, as ``Member`` keeps it -----------------------------------------
    @property
    def member(self) -> Member:
        return self.members[0]

    @property
    def best_val(self) -> float:
        return self.member.stopping.best_val

    @property
    def best_epoch(self) -> int:
        return self.member.stopping.best_epoch

    @property
    def history(self) -> list[dict]:
        return self.member.history

    @property
    def best_state(self) -> dict | None:
        return self.member.best_state

    @best_state.setter
    def best_state(self, state: dict | None) -> None:
        self.member.best_state = state

    @property
    def schedule(self) -> Schedule:
        return self.member.schedule

    # ---- state for checkpoints -----------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly as if uninterrupted
        (``cae.train.loop.trial_checkpoint``); a pack's member saves the same keys."""
        return trial_checkpoint(self.model.state_dict(), self.opt.state_dict(), self.epoch,
                                self.member)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of this trial, alone or as a pack's member (a random state saved by
        an older cae is not needed: see ``trial_checkpoint``)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.member.load(state, self.device)
        # dropout masks are a function of the training steps so far
        set_dropout_step(self.model, self.epoch * self.steps_per_epoch)

    # ---- the runner of one member (``cae.train.loop.Runner``) ------------------------
    def live(self) -> list[int]:
        return [] if self.member.stop_reason else [0]

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=self.dtype, memory_format=torch.channels_last)

    def train_epoch(self) -> list[float]:
        cfg, model, member = self.cfg, self.model, self.member
        model.train()
        train = self.splits.train
        n = train.shape[0]
        perm = batch_order(member.gen, cfg.seed, self.epoch, n)
        total = torch.zeros((), device=self.device)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            x, y, _ = self.task.batch(train[idx], idx, member.gen)
            mark_step(cfg.compile, self.device)
            with autocast(self.precision, self.device):
                z = self.enc(self._inputs(x))
                out = self.dec(z)
            loss = per_sample_loss(cfg.loss, out, y).mean() + model.penalty(z)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.opt.step()
            member.schedule.after_step()
            total += loss.detach() * idx.numel()
        return [float(total) / n]  # the one host sync of the epoch

    def evaluate(self, prepared: tuple) -> list[dict]:
        """Mean loss over a prepared split, per distortion group, and the task's extra
        errors (colorize: in RGB), computed in fp32 whatever the training precision: every
        trial's (and the baselines') errors are measured alike."""
        self.model.eval()
        return evaluate(lambda x: self.dec(self.enc(self._inputs(x))).unsqueeze(0), prepared,
                        self.task, [self.cfg.loss], self.cfg.eval_batch_size,
                        lambda: mark_step(self.cfg.compile, self.device))

    def weights(self, index: int = 0) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def test(self, indices: list[int] | None = None) -> dict:
        """Test-split errors of the best (by validation) weights, into ``member.test`` (and
        returned); the model keeps its own (last epoch's) weights afterwards, so a
        checkpoint saved later says what it holds. ``indices`` (the loop's): [] tests
        nothing."""
        if indices is not None and 0 not in indices:
            return self.member.test
        current = None
        if self.best_state is not None:
            current = self.weights()
            self.model.load_state_dict(self.best_state)
        try:
            prepared = self.task.eval_inputs(self.splits.test, seed=self.cfg.task.eval_seed + 1)
            self.member.test = {f"test_{k}": v for k, v in self.evaluate(prepared)[0].items()}
        finally:
            if current is not None:
                self.model.load_state_dict(current)
        return self.member.test

    def rates_changed(self) -> None:
        """Nothing to do: the schedule moves the optimiser's own rate."""

    def retire(self, indices: list[int]) -> None:
        """Nothing to free: a trial that stopped trains no more (``live`` is empty)."""

    # ---- the run --------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
            evaluate_test: bool = False) -> str:
        """Train until max_epochs, patience or a divergence; return the stop reason.

        ``on_epoch(metrics, state)`` after each epoch: the last epoch's metrics carry
        ``stop_reason``, and ``state()`` is its checkpoint. ``evaluate_test``: the test
        errors of the best weights go into ``member.test`` when the trial stops (``test()``
        measures them on demand)."""
        callback = None if on_epoch is None else (
            lambda metrics: on_epoch(metrics[0], self.state_dict))
        return loop.fit(self, callback, evaluate_test=evaluate_test)[0]


def train(
    cfg: TrialConfig,
    data: ImageData | None = None,
    on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
    evaluate_test: bool = True,
) -> TrainResult:
    """Train one trial to the end and evaluate it on the test split.

    ``on_epoch(metrics, state)`` is called after each epoch; ``state()`` returns the
    checkpoint dict (model, optimiser, epoch, early-stopping state). ``resume`` is such a
    dict: the run continues after its epoch. A trial that diverges raises ``Diverged``
    (after its last epoch's ``on_epoch``): there is no model to return.
    """
    trainer = Trainer(cfg, data)
    if resume is not None:
        trainer.load_state_dict(resume)
    reason = trainer.fit(on_epoch, evaluate_test=evaluate_test)
    if reason == "diverged":
        raise Diverged(trainer.member.error)
    result = TrainResult(
        history=trainer.history,
        best_val=trainer.best_val,
        best_epoch=trainer.best_epoch,
        stop_reason=reason,
        params=count_params(trainer.model),
        latent_size=trainer.model.plan.latent_size,
        model=trainer.model,
        best_state=trainer.best_state,
    )
    if evaluate_test and not trainer.member.test:  # resumed from the end: nothing trained
        trainer.test()
    result.test = trainer.member.test
    return result


def save_run(out: str | Path, cfg: TrialConfig, result: TrainResult) -> None:
    """``cae train --out``: the config, the last and best weights, and the history."""
    import yaml

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    torch.save({"model": result.model.state_dict(), "best_model": result.best_state,
                "config": cfg.model_dump(mode="json")}, path / "model.pt")
    (path / "history.json").write_text(json.dumps(
        {"history": result.history, "test": result.test, "best_epoch": result.best_epoch,
         "stop_reason": result.stop_reason, "params": result.params,
         "latent_size": result.latent_size}, indent=2))


def _epoch_line(m: dict, max_epochs: int) -> str:
    extra = "  ".join(f"{k[4:]} {v:.4f}" for k, v in m.items()
                      if k.startswith("val_") and k not in ("val_loss", "best_val_loss"))
    return (f"epoch {m['epoch']:>3}/{max_epochs}  train {m['train_loss']:.5f}  "
            f"val {m['val_loss']:.5f}  {m['epoch_time_s']:.1f}s"
            + (f"  [{extra}]" if extra else ""))


def train_and_print(cfg: TrialConfig, out: str | None = None) -> int:
    """``cae train``: one trial without Ray, a line per epoch, saved to ``out`` if given;
    returns the exit status (1 if the trial diverged)."""
    import sys

    from cae.model.plan import describe

    info = describe(cfg.model)
    device = resolve_device(cfg.device)
    print(f"model {cfg.model.preset or 'custom'}: {info['params']:,} params, latent "
          f"{info['latent_size']} {info['latent_shape']}; task {cfg.task.name} on "
          f"{cfg.data.dataset}; device {device}, {resolve_precision(cfg.precision, device)}",
          flush=True)
    try:
        result = train(cfg, on_epoch=lambda m, _s: print(_epoch_line(m, cfg.max_epochs),
                                                          flush=True))
    except Diverged as exc:
        print(f"cae: trial diverged: {exc}", file=sys.stderr)
        return 1
    test = "  ".join(f"{k} {v:.5f}" for k, v in result.test.items())
    print(f"done: best val {result.best_val:.5f} at epoch {result.best_epoch}; stopped by "
          f"{result.stop_reason}; {test}")
    if out:
        save_run(out, cfg, result)
        print(f"saved to {out}")
    return 0

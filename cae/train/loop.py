"""The one training loop (:func:`fit`) and its rules, for a trial alone
(``cae.train.trainer.Trainer``) and for the members of a pack (``cae.train.pack.Pack``) alike:
the order of the batches, the loss, the evaluation, when a trial stops, what it reports after
an epoch and what its checkpoint holds.

:func:`fit` owns the epochs: the counter and the clock, each member's :class:`Stopping` rule
and best weights, its metrics, learning-rate schedule and history, the test of the best
weights when it stops, the caller's callback, and what a divergence does. It drives a
*runner* (:class:`Runner`) of K members, which owns the tensors: a ``Trainer`` is the runner of
one trial in plain PyTorch, a ``Pack`` the runner of K under ``vmap``. So a trial and a
pack's member cannot drift apart. Losses are summed on the device and read once per
evaluation: no host synchronisation per batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from cae.config.trial import SEED_STRIDE, TrialConfig
from cae.train.optimizers import Schedule
from cae.train.tasks import Task


class Diverged(RuntimeError):
    """A trial's training or validation loss became NaN or infinite (raised by
    ``cae.train.trainer.train`` for a caller that wants one trained model; the loop itself
    lets a diverging member leave, see :func:`fit`)."""


# ---- the batches ---------------------------------------------------------------------------


def batch_order(gen: torch.Generator, seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of a trial's training images in ``epoch`` (counted from 0), and ``gen``
    left where the epoch's random distortions continue: a function of the trial's own seed
    and the epoch alone, so a resumed trial, and a trial trained in a pack, see the same."""
    gen.manual_seed(seed * SEED_STRIDE + epoch)
    return torch.randperm(n, generator=gen, device=gen.device)


# ---- the loss ------------------------------------------------------------------------------


def per_sample_loss(kind: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of each sample, (B,), averaged over its pixels; computed in float32 (in float64
    for a float64 model, as the exactness tests run)."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    out, target = out.to(dtype), target.to(dtype)
    if kind == "mse":
        loss = F.mse_loss(out, target, reduction="none")
    elif kind == "l1":
        loss = F.l1_loss(out, target, reduction="none")
    else:
        loss = F.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    return loss.flatten(1).mean(1)


def member_losses(kinds: Sequence[str], out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample losses (K, B) of outputs (K, B, ...) against targets: each member's own
    (K, B, ...), or one shared by all (B, ...); each row with its member's loss kind."""
    k, b = out.shape[:2]
    target = y if y.dim() == out.dim() else y.unsqueeze(0).expand(k, *y.shape)
    if len(set(kinds)) == 1:
        return per_sample_loss(kinds[0], out.flatten(0, 1), target.flatten(0, 1)).view(k, b)
    return torch.stack([per_sample_loss(kind, out[r], target[r])
                        for r, kind in enumerate(kinds)])


# ---- evaluation ----------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(run: Callable[[torch.Tensor], torch.Tensor], prepared: tuple, task: Task,
             kinds: Sequence[str], batch_size: int,
             before_batch: Callable[[], None] = lambda: None) -> list[dict]:
    """Each member's mean loss over a prepared split (``Task.eval_inputs``), per distortion
    group, and the task's extra errors (colorize: in RGB). ``run(x)`` maps the shared
    inputs (B, ...) to every member's outputs (K, B, ...); ``kinds`` are their loss kinds."""
    x_all, y_all, groups = prepared
    n = x_all.shape[0]
    names = task.group_names or []
    sums = per_group = counts = None
    extra: dict[str, torch.Tensor] = {}
    for start in range(0, n, batch_size):
        x, y = x_all[start:start + batch_size], y_all[start:start + batch_size]
        before_batch()
        out = run(x)  # (K, B, ...)
        losses = member_losses(kinds, out, y).double()  # (K, B)
        k = losses.shape[0]
        if sums is None:
            sums = torch.zeros(k, device=losses.device, dtype=torch.float64)
            per_group = torch.zeros(k, len(names), device=losses.device, dtype=torch.float64)
            counts = torch.zeros_like(per_group)
        sums += losses.sum(1)
        if names:
            g = groups[start:start + batch_size]
            per_group.index_add_(1, g, losses)
            counts.index_add_(1, g, torch.ones_like(losses))
        xs = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        ys = y.unsqueeze(0).expand(k, *y.shape).flatten(0, 1)
        for key, err in task.extra_errors(xs, out.flatten(0, 1), ys).items():
            extra[key] = extra.get(key, 0.0) + err.double().view(k, -1).sum(1)
    return _results(n, names, sums.tolist(), per_group.tolist(), counts.tolist(),
                    {key: total.tolist() for key, total in extra.items()})


def _results(n: int, names: list[str], sums: list, per_group: list, counts: list,
             extras: dict[str, list]) -> list[dict]:
    """The host-side sums of :func:`evaluate` (its one sync) -> each member's means."""
    results = []
    for r in range(len(sums)):
        result = {"loss": sums[r] / n}
        for j, name in enumerate(names):
            c = counts[r][j]
            result[f"loss_{name}"] = per_group[r][j] / c if c else math.nan
        result.update({key: totals[r] / n for key, totals in extras.items()})
        results.append(result)
    return results


# ---- a trial's checkpoint -----------------------------------------------------------------


def trial_checkpoint(model: dict, optimizer: dict, epoch: int, member: Member,
                     **extra) -> dict:
    """The one checkpoint schema of a trial, alone (``Trainer.state_dict``) or a pack's
    member (``Pack.member_state``): the weights and BatchNorm statistics (``model``, plain
    CAE keys), its ``torch.optim`` optimiser's ``state_dict``, the epoch, the stopping
    counters, the best weights, the history, the learning-rate schedule, its test errors and
    divergence once it has stopped, and the caller's ``final`` report. Either loads into a
    plain CAE and its optimiser, a ``Trainer`` or any pack (``Pack.load_members``), and
    ``cae.run.checkpoints`` reads both alike.

    No random state: every draw of training comes from the member's own generator, reseeded
    from (seed, epoch) when an epoch starts (:func:`batch_order`), and dropout masks are a
    hash of (seed, layer, step) (``cae.train.stacked.MaskedDropout``), so the epoch alone
    says where each stream stands."""
    return {"model": model, "optimizer": optimizer, "epoch": epoch, **member.stopping.state(),
            "best_model": member.best_state, "history": member.history, "final": member.final,
            "schedule": member.schedule.state_dict(), "test": member.test,
            "error": member.error, **extra}


# ---- when a trial stops --------------------------------------------------------------------


@dataclass
class Stopping:
    """The early-stopping rule of one trial: an epoch improves on the best when its
    validation loss beats it by more than ``min_delta`` (the best weights are that epoch's);
    ``patience`` epochs in a row without improvement stop the trial, and so does its last
    epoch; a loss that is not finite is a divergence. Its state is three numbers, kept in
    every checkpoint under the keys of :meth:`state`."""

    patience: int | None
    min_delta: float
    max_epochs: int
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    @classmethod
    def of(cls, cfg: TrialConfig) -> Stopping:
        return cls(cfg.patience, cfg.min_delta, cfg.max_epochs)

    @staticmethod
    def divergence(epoch: int, train_loss: float, val_loss: float) -> str | None:
        """Why an epoch's losses end the trial as diverged, if they do."""
        if not math.isfinite(train_loss):
            return f"train loss became {train_loss} at epoch {epoch}"
        if not math.isfinite(val_loss):
            return f"val loss became {val_loss} at epoch {epoch}"
        return None

    def update(self, epoch: int, val_loss: float) -> bool:
        """Count ``epoch``'s validation loss; whether it is the new best."""
        if val_loss < self.best_val - self.min_delta:
            self.best_val, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def exhausted(self) -> bool:
        """Whether the patience has run out (a trial resumed after it had stopped)."""
        return bool(self.patience) and self.bad_epochs >= self.patience

    def reason(self, epoch: int) -> str | None:
        """Why the trial stops after ``epoch`` (patience, or its last epoch), if it does."""
        if self.exhausted():
            return "patience"
        return "max_epochs" if epoch >= self.max_epochs else None

    def metrics(self, epoch: int, train_loss: float, val: dict) -> dict:
        """What a trial (or a pack's member) reports after an epoch; ``best_val_loss`` and
        ``best_epoch`` by this rule, which the tables take as the trial's own."""
        return {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                **{f"val_{k}": v for k, v in val.items() if k != "loss"},
                "best_val_loss": self.best_val, "best_epoch": self.best_epoch}

    def state(self) -> dict:
        return {"best_val": self.best_val, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load(self, state: dict) -> None:
        self.best_val = float(state["best_val"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


# ---- one trial, as the loop sees it -------------------------------------------------------


@dataclass
class Member:
    """One trial that a runner trains (a ``Trainer``'s only one, or a pack's member): its
    config, its stopping rule, the generator of its batches' order and distortions, its
    learning-rate schedule, its history, and how it ended. ``final`` is the caller's (the
    sweep's last report of the trial), kept in its checkpoint."""

    index: int
    cfg: TrialConfig
    schedule: Schedule
    gen: torch.Generator
    stopping: Stopping
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)
    stop_reason: str = ""  # "" while it trains
    error: str = ""  # why it diverged
    test: dict = field(default_factory=dict)
    final: dict | None = None

    def load(self, state: dict, device: torch.device) -> None:
        """Its part of a checkpoint (:func:`trial_checkpoint`): stopping counters, schedule,
        best weights, history, and whether it has ended, by its rule and its own config
        (whose ``max_epochs`` may be higher than the checkpoint's: ``cae extend``)."""
        self.stopping.load(state)
        self.schedule.load_state_dict(state.get("schedule"))
        best = state.get("best_model")
        self.best_state = None if best is None else {k: v.to(device) for k, v in best.items()}
        self.history = list(state.get("history") or [])
        self.final = state.get("final")
        self.test = dict(state.get("test") or {})
        self.error = str(state.get("error") or "")
        self.stop_reason = "diverged" if self.error else (
            self.stopping.reason(int(state["epoch"])) or "")


class Runner(Protocol):
    """What :func:`fit` drives: K members' tensors. ``live()`` are the indices of the members
    still training, in the order the runner computes them; ``train_epoch`` and ``evaluate``
    return one value per live member in that order."""

    members: list[Member]
    epoch: int
    val: tuple  # the validation split, prepared once (``Task.eval_inputs``)

    def live(self) -> list[int]: ...

    def train_epoch(self) -> list[float]: ...

    def evaluate(self, prepared: tuple) -> list[dict]: ...

    def weights(self, index: int) -> dict[str, torch.Tensor]: ...

    def test(self, indices: list[int]) -> None: ...

    def rates_changed(self) -> None: ...

    def retire(self, indices: list[int]) -> None: ...


def member_epoch(member: Member, epoch: int, train_loss: float, val: dict,
                 weights: Callable[[], dict]) -> dict:
    """One member's epoch by the trial's rules: its metrics (with ``stop_reason`` on its last
    epoch). A loss that is not finite ends it as ``diverged`` with the reason in
    ``member.error``: it leaves without a test, and the others go on (nothing raises, so a
    pack is not lost to one member, and a deterministic divergence is not retried)."""
    problem = Stopping.divergence(epoch, train_loss, val["loss"])
    member.error = f"diverged: {problem}" if problem else ""
    if not member.error and member.stopping.update(epoch, val["loss"]):
        member.best_state = weights()
    metrics = member.stopping.metrics(epoch, train_loss, val)
    metrics["lr"] = member.schedule.epoch_lr  # its last step's
    if not member.error:
        member.schedule.after_epoch(val["loss"])
    member.stop_reason = "diverged" if member.error else (member.stopping.reason(epoch) or "")
    if member.stop_reason:
        metrics["stop_reason"] = member.stop_reason
    return metrics


EpochCallback = Callable[[dict[int, dict]], None]


def fit(runner: Runner, on_epoch: EpochCallback | None = None, evaluate_test: bool = True,
        until: int | None = None) -> dict[int, str]:
    """Train ``runner``'s members until each has stopped (or, with ``until``, until the
    runner's epoch reaches it); each member's stop reason ("" for one still training).

    After each epoch ``on_epoch(metrics)`` gets the metrics of every member that trained in
    it, by index (``stop_reason`` on a member's last epoch, whose test errors, on its best
    weights, are in ``member.test`` by then); members leaving are still in the runner then,
    so their checkpoints can be taken. ``epoch_time_s`` is the runner's epoch, training and
    validation, for every member it trained."""
    for i in runner.live():  # resumed from the checkpoint of a member that had ended
        member = runner.members[i]
        member.stop_reason = member.stop_reason or member.stopping.reason(runner.epoch) or ""
    runner.retire([i for i in runner.live() if runner.members[i].stop_reason])
    while runner.live() and (until is None or runner.epoch < until):
        t0 = time.perf_counter()
        live = runner.live()
        train = runner.train_epoch()
        runner.epoch += 1
        val = runner.evaluate(runner.val)
        elapsed = time.perf_counter() - t0
        metrics = {}
        for i, train_loss, errors in zip(live, train, val, strict=True):
            metrics[i] = member_epoch(runner.members[i], runner.epoch, train_loss, errors,
                                      lambda i=i: runner.weights(i))
            metrics[i]["epoch_time_s"] = elapsed
        runner.rates_changed()
        leaving = [i for i in live if runner.members[i].stop_reason]
        if evaluate_test:
            runner.test([i for i in leaving if not runner.members[i].error])
        for i, m in metrics.items():
            runner.members[i].history.append(m)
        if on_epoch is not None:
            on_epoch(metrics)
        if leaving:
            runner.retire(leaving)
    return {m.index: m.stop_reason for m in runner.members}

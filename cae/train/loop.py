"""The rules of the one training loop, shared by a trial (``cae.train.trainer.Trainer``) and
every member of a pack (``cae.train.pack.Pack``): the order of the batches, the loss, the
evaluation, when a trial stops and what it reports after an epoch.

Both loops are written over a leading member axis: a single trial is a pack of one here,
so the two cannot drift apart. Losses are summed on the device and read once per
evaluation: no host synchronisation per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cae.config.trial import SEED_STRIDE, TrialConfig
from cae.train.tasks import Task


class Diverged(RuntimeError):
    """The training or validation loss became NaN or infinite."""


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


def trial_checkpoint(model: dict, optimizer: dict, epoch: int, stopping: Stopping,
                     best_model: dict | None, history: list[dict], final: dict | None,
                     **extra) -> dict:
    """The one checkpoint schema of a trial, alone (``Trainer.state_dict``) or a pack's
    member (``Pack.member_state``): either loads into a plain CAE and ``torch.optim.Adam``,
    and ``cae.run.checkpoints`` reads both alike."""
    return {"model": model, "optimizer": optimizer, "epoch": epoch, **stopping.state(),
            "best_model": best_model, "history": history, "final": final, **extra}


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

"""How a trial optimises: the optimiser, the learning-rate schedule and gradient clipping.

Sweepable by dotted keys like any other setting (``optimizer.name``, ``schedule.name``,
``schedule.warmup_epochs``, ``grad_clip``, ...). The defaults are Adam at a constant
learning rate without clipping, what every trial ran before these settings existed, so
specs and records that do not name them mean exactly that.

Which settings apply to what:

- ``optimizer.momentum`` and ``optimizer.nesterov``: ``sgd`` only; ``betas`` and ``eps``:
  ``adam`` and ``adamw``. ``weight_decay`` (a trial setting) is L2 added to the gradient
  for ``adam`` and ``sgd`` and decoupled for ``adamw``, as in ``torch.optim``.
- ``schedule``: ``constant``; ``cosine`` (to ``lr * min_lr_ratio`` at ``max_epochs``);
  ``step`` (times ``gamma`` every ``step_size`` epochs); ``plateau`` (times ``gamma`` after
  ``plateau_patience`` epochs without a better validation loss, better as the trial's
  stopping rule counts it (by more than ``min_delta``), down to ``lr * min_lr_ratio``);
  ``onecycle`` (per step: from ``lr / 25`` up to ``lr`` over the first ``pct_start`` of the
  trial's steps, then down to ``lr * min_lr_ratio``, or to torch's default ``lr / 250000``
  when that is 0).
  ``warmup_epochs`` ramps ``cosine`` and ``step`` up linearly from ``lr / (warmup + 1)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cae.config.base import Strict


class OptimizerConfig(Strict):
    """The optimiser of a trial (``torch.optim``)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd
    nesterov: bool = False  # sgd, with momentum > 0
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    eps: float = Field(1e-8, gt=0.0)  # adam, adamw

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas {list(self.betas)}: each must be in [0, 1)")
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("optimizer.nesterov needs optimizer.name 'sgd' and "
                             "optimizer.momentum > 0")
        return self


class ScheduleConfig(Strict):
    """The learning rate over a trial's epochs (``torch.optim.lr_scheduler``)."""

    name: Literal["constant", "cosine", "onecycle", "step", "plateau"] = "constant"
    warmup_epochs: int = Field(0, ge=0)  # cosine, step
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # cosine, plateau, onecycle
    step_size: int = Field(1, ge=1)  # step
    gamma: float = Field(0.1, gt=0.0, le=1.0)  # step, plateau
    plateau_patience: int = Field(2, ge=0)  # plateau
    pct_start: float = Field(0.3, gt=0.0, lt=1.0)  # onecycle

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.warmup_epochs and self.name not in ("cosine", "step"):
            raise ValueError(f"schedule.warmup_epochs applies to 'cosine' and 'step', not to "
                             f"'{self.name}' ('onecycle' warms up over pct_start; 'plateau' "
                             "follows the validation loss)")
        return self

"""A trial's optimiser and learning-rate schedule (``optimizer``, ``schedule``, ``grad_clip``
in its config), for a trial alone and for the members of a pack.

A trial alone steps ``torch.optim.Adam``, ``AdamW`` or ``SGD`` and a ``torch.optim.lr_scheduler``
(:func:`make_optimizer`, :class:`Schedule`). A pack steps K members at once on its flat
(K, P) weights (:class:`BatchedOptimizer`: the same element-wise updates as torch's, with
each member's own learning rate, weight decay, betas, momentum and clipping norm), and each
member keeps a :class:`Schedule` of its own over a stand-in optimiser whose learning rate
the pack reads: the same scheduler code gives a member the rates its trial would have.
"""

from __future__ import annotations

import math

import torch

from cae.config.trial import TrialConfig

# The state tensors each optimiser keeps per parameter, as torch.optim names them.
BUFFERS = {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"),
           "sgd": ("momentum_buffer",)}


def make_optimizer(params, cfg: TrialConfig) -> torch.optim.Optimizer:
    """``torch.optim``'s optimiser for ``cfg`` over ``params``."""
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=o.betas, eps=o.eps, weight_decay=cfg.weight_decay)


class Schedule:
    """The learning rate of one trial over its steps and epochs: a ``torch.optim.lr_scheduler``
    acting on ``optimizer`` (none for ``constant``). ``onecycle`` moves per step, the others
    per epoch (``plateau`` on the validation loss)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int):
        self.optimizer = optimizer
        self.name = cfg.schedule.name
        self.scheduler = _scheduler(optimizer, cfg, steps_per_epoch)
        self.last_step_lr: float | None = None

    @property
    def lr(self) -> float:
        """The rate the next step takes."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def epoch_lr(self) -> float:
        """The rate of the last step taken (what an epoch reports at its end)."""
        return self.lr if self.last_step_lr is None else self.last_step_lr

    def after_step(self) -> None:
        if self.name == "onecycle":
            self.last_step_lr = self.lr
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.name == "plateau":
            self.scheduler.step(val_loss)
        elif self.name not in ("constant", "onecycle"):
            self.scheduler.step()

    def state_dict(self) -> dict | None:
        return None if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's schedule, with the optimiser's learning rate where it was (a
        checkpoint from before schedules existed holds none: constant, nothing to load)."""
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)
            last = getattr(self.scheduler, "_last_lr", None)
            if last is not None:
                for group, lr in zip(self.optimizer.param_groups, last):
                    group["lr"] = lr


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int):
    s, sched = cfg.schedule, torch.optim.lr_scheduler
    low = cfg.lr * s.min_lr_ratio
    if s.name == "constant":
        return None
    if s.name == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, pct_start=s.pct_start,
                                total_steps=cfg.max_epochs * steps_per_epoch,
                                cycle_momentum=False, anneal_strategy="cos",
                                # its last rate is (lr / div_factor) / final_div_factor
                                div_factor=25.0,
                                final_div_factor=(cfg.lr / 25.0 / low) if low else 1e4)
    if s.name == "plateau":
        # "better" as the trial's stopping rule has it: by more than min_delta
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=s.gamma,
                                       patience=s.plateau_patience, min_lr=low,
                                       threshold=cfg.min_delta, threshold_mode="abs")
    w = s.warmup_epochs
    if s.name == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs - w, eta_min=low)
    else:
        main = sched.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if not w:
        return main
    warm = sched.LinearLR(optimizer, start_factor=1 / (w + 1), total_iters=w)
    return sched.SequentialLR(optimizer, [warm, main], milestones=[w])


def clip_grad_rows(grad: torch.Tensor, max_norm: torch.Tensor) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for each member's gradient row of a (K, P) stack,
    in place (a member without clipping has an infinite ``max_norm``)."""
    norms = torch.linalg.vector_norm(grad, dim=1)  # (K,)
    coef = (max_norm.to(grad.dtype) / (norms + 1e-6)).clamp(max=1.0)
    grad.mul_(coef.unsqueeze(1))


class BatchedOptimizer:
    """``torch.optim.Adam``, ``AdamW`` or ``SGD`` (the pack's one ``optimizer.name``) for K
    members at once on a flat (K, P) parameter: each member its own learning rate, weight
    decay, betas, eps, momentum, Nesterov switch and clipping norm, given as (K,) tensors;
    a member with learning rate 0 and no weight decay does not move. The same element-wise
    steps as torch's, so a member's weights equal its trial's (to rounding)."""

    def __init__(self, name: str, flat: torch.Tensor):
        self.name = name
        self.buffers = {b: torch.zeros_like(flat) for b in BUFFERS[name]}
        self.steps = 0
        self.settings: dict[str, torch.Tensor] = {}
        self.clipping = False

    def set(self, settings: dict[str, torch.Tensor], clipping: bool | None = None) -> None:
        """Per-member (K,) settings (:func:`member_settings`: lr, weight_decay, beta1,
        beta2, eps, momentum, nesterov, max_norm); ``clipping``: whether any member clips
        (known on the host, so a step needs no device sync to know it)."""
        self.settings.update(settings)
        if clipping is not None:
            self.clipping = clipping

    def col(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self.settings[key].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, flat: torch.Tensor, grad: torch.Tensor) -> None:
        self.steps += 1
        if self.clipping:
            clip_grad_rows(grad, self.settings["max_norm"])
        lr, wd = self.col("lr", flat), self.col("weight_decay", flat)
        if self.name == "sgd":
            grad = grad.addcmul(flat, wd)
            buf, m = self.buffers["momentum_buffer"], self.col("momentum", flat)
            buf.mul_(m).add_(grad)  # the first step: 0 * m + grad, torch's clone of grad
            nesterov = self.col("nesterov", flat)
            flat.sub_(lr * torch.where(nesterov > 0, grad + m * buf, buf))
            return
        if self.name == "adamw":
            flat.mul_(1 - lr * wd)
        else:
            grad = grad.addcmul(flat, wd)
        b1, b2 = self.settings["beta1"], self.settings["beta2"]
        m, v = self.buffers["exp_avg"], self.buffers["exp_avg_sq"]
        m.lerp_(grad, 1 - self.col("beta1", flat))
        v.mul_(self.col("beta2", flat)).addcmul_((1 - self.col("beta2", flat)) * grad, grad)
        bias1, bias2 = 1 - b1**self.steps, 1 - b2**self.steps  # (K,) float64
        step_size = (self.settings["lr"] / bias1).to(flat.dtype).view(-1, 1)
        denom = (v.sqrt() / bias2.sqrt().to(flat.dtype).view(-1, 1)).add_(self.col("eps", flat))
        flat.addcdiv_(m * -step_size, denom)

    def member_state(self, row: int, names: list[str], views, group: dict) -> dict:
        """One member's state as its trial's ``torch.optim`` optimiser's ``state_dict()``
        gives it: ``group`` is that optimiser's parameter group (the member's stand-in's,
        with its schedule's entries), ``views(t)`` splits a (1, P) row into the parameters
        named ``names``."""
        rows = {b: views(t[row:row + 1]) for b, t in self.buffers.items()}
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state = {}
        for i, n in enumerate(names):
            if self.name == "sgd":
                if group["momentum"]:
                    state[i] = {"momentum_buffer": rows["momentum_buffer"][n][0].clone()}
                continue
            state[i] = {"step": torch.tensor(float(self.steps), dtype=dtype),
                        **{b: rows[b][n][0].clone() for b in BUFFERS[self.name]}}
        return {"state": state,
                "param_groups": [{**group, "params": list(range(len(names)))}]}


def member_settings(cfgs: list[TrialConfig | None], lrs: list[float],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The (K,) settings of :class:`BatchedOptimizer` for the members ``cfgs`` (None: an
    empty slot, which does not move) at learning rates ``lrs``."""
    def per(f, empty: float = 0.0) -> torch.Tensor:
        return torch.tensor([f(c) if c is not None else empty for c in cfgs],
                            dtype=torch.float64, device=device)

    return {"lr": torch.tensor(lrs, dtype=torch.float64, device=device),
            "weight_decay": per(lambda c: c.weight_decay),
            "beta1": per(lambda c: c.optimizer.betas[0], 0.9),
            "beta2": per(lambda c: c.optimizer.betas[1], 0.999),
            "eps": per(lambda c: c.optimizer.eps, 1e-8),
            "momentum": per(lambda c: c.optimizer.momentum),
            "nesterov": per(lambda c: float(c.optimizer.nesterov)),
            "max_norm": per(lambda c: c.grad_clip or math.inf, math.inf)}

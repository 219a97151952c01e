"""Fused packs: trials of one architecture trained side by side as one wider model.

A pack holds K members (trials that ``cae.train.packing.pack_key`` says may fuse). Their weights are
stacked, one row per member, into one flat ``(K, P)`` parameter, their BatchNorm running
statistics into ``(K, ...)`` buffers (each member its own), and ``torch.func.vmap`` runs the
one CAE over the stack (a vmapped convolution is one grouped convolution, forward and
backward), so each step costs a few wide kernels instead of K times many small ones.

What the members share and what they keep, and how a plain run reproduces a member:

- **The batches.** Each member sees its own batches: the order and the random distortions
  its trial has unfused (``cae.train.loop.batch_order`` from the member's seed), stacked into
  (K, B, ...) inputs that ``vmap`` hands each member its row of. So fusing is a speed
  setting, not another experiment: a member computes what its trial computes alone.
- **Dropout.** ``nn.Dropout`` draws from the global generator, so K members under vmap could
  not each match a plain run. Members, and plain trials alike, use :class:`MaskedDropout`:
  its mask is a hash of (member seed, layer, step, element), with the member's own rate;
  stateless, so it is the same in a pack, in a plain trial, and after a resume. Its buffers
  are not persistent: state dicts keep plain CAE keys.
- **The optimiser.** :class:`~cae.train.optimizers.BatchedOptimizer` is the members' one
  ``optimizer.name`` (Adam, AdamW or SGD) stepped on the flat stack, each member with its own
  learning rate, weight decay, betas, momentum and clipping norm; each member's learning-rate
  schedule is its own (a ``torch.optim.lr_scheduler`` over a stand-in optimiser whose rate
  the pack reads): a handful of kernels per step whatever the number of tensors.
- **Stopping.** Each member keeps its own ``cae.train.loop.Stopping`` rule; a member
  that stops leaves the pack with its test errors measured on its best weights (one that
  diverges leaves without them), the caller saves its checkpoint, and the pack shrinks (at
  once when eager; under ``compile`` when half the slots are empty, so shapes, and
  compilations, change at most log2(K) times; an empty slot meanwhile trains nothing:
  learning rate 0, zero weights).
- **Checkpoints.** :meth:`Pack.member_state` is a member's checkpoint in ``Trainer``'s format
  (model, best_model, optimizer as ``torch.optim.Adam`` saves it, epoch, history, ...), so it
  loads into a plain ``CAE``; :meth:`Pack.state_dict` is the whole pack, for an exact resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.func import stack_module_state

from cae.config.trial import TrialConfig
from cae.data.datasets import ImageData, load, split, to_device
from cae.model.network import CAE, build_model
from cae.train.hardware import autocast, compiler, mark_step, resolve_device, resolve_precision
from cae.train.loop import Stopping, batch_order, evaluate, member_losses, trial_checkpoint
from cae.train.optimizers import (
    BUFFERS,
    BatchedOptimizer,
    Schedule,
    make_optimizer,
    member_settings,
)
from cae.train.packing import pack_key
from cae.train.stacked import Layout, Stack, run_stack, use_masked_dropout
from cae.train.tasks import make_task

# ---- members ----------------------------------------------------------------------------


@dataclass
class Member:
    """One trial of the pack: its config, its stopping rule, its batches' generator, its
    learning-rate schedule (over ``stand_in``, an optimiser of its trial's kind holding only
    the rate) and its history."""

    index: int
    cfg: TrialConfig
    stopping: Stopping
    gen: torch.Generator  # its batches' order and distortions
    stand_in: torch.optim.Optimizer
    schedule: Schedule
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)
    stop_reason: str = ""  # "" while it trains
    error: str = ""  # why it diverged
    test: dict = field(default_factory=dict)
    final: dict | None = None  # set by the caller (the last report), saved with the pack

    @classmethod
    def start(cls, index: int, cfg: TrialConfig, device: torch.device,
              steps_per_epoch: int) -> Member:
        stand_in = make_optimizer([torch.zeros(1)], cfg)
        schedule = Schedule(stand_in, cfg, steps_per_epoch)
        stand_in.step()  # moves nothing (no gradient); tells torch's schedulers it steps
        return cls(index, cfg, Stopping.of(cfg), torch.Generator(device=device), stand_in,
                   schedule)

    def record(self) -> dict:
        """What a pack's checkpoint keeps of the member."""
        return {**self.stopping.state(), "schedule": self.schedule.state_dict(),
                **{k: getattr(self, k) for k in ("best_state", "history", "stop_reason",
                                                 "error", "test", "final")}}

    def load(self, record: dict, device: torch.device) -> None:
        self.stopping.load(record)
        self.schedule.load_state_dict(record.get("schedule"))
        for key in ("best_state", "history", "stop_reason", "error", "test", "final"):
            setattr(self, key, record[key])
        if self.best_state is not None:
            self.best_state = {k: v.to(device) for k, v in self.best_state.items()}


# ---- the pack ----------------------------------------------------------------------------

EpochCallback = Callable[[dict[int, dict], Callable[[], dict]], None]


class Pack:
    """K fusable trials trained together; ``fit`` runs the epochs (see the module doc).

    Members are named by their index in ``cfgs``."""

    def __init__(self, cfgs: list[TrialConfig], data: ImageData | None = None,
                 evaluate_test: bool = True):
        if not cfgs:
            raise ValueError("a pack needs at least one member")
        names = sorted({c.optimizer.name for c in cfgs})
        if len(names) > 1:
            raise ValueError(f"a pack's members share one batched optimiser, and these name "
                             f"several (optimizer.name: {', '.join(names)}): pack them apart")
        keys = {pack_key(c) for c in cfgs}
        if len(keys) > 1:
            raise ValueError("these trials cannot fuse: they differ in more than "
                             "cae.train.packing.FUSABLE")
        c0 = self.cfg = cfgs[0]
        self.evaluate_test = evaluate_test
        self.device = resolve_device(c0.device)
        self.precision = resolve_precision(c0.precision, self.device)
        data = data if data is not None else load(c0.data)
        self.splits = to_device(split(data, c0.data.val_fraction, c0.data.split_seed),
                                self.device)
        self.task = make_task(c0.task)
        self.val = self.task.eval_inputs(self.splits.val, seed=c0.task.eval_seed)
        self._test_inputs = None
        models = [self._build(c) for c in cfgs]
        self.base = models[0]
        self.dtype = next(self.base.parameters()).dtype
        self.layout = Layout(self.base)
        names = [n for n, m in self.base.named_modules() if m in self.base._edges]
        self.edge_names = [f"{n}.weight" for n in names]
        _, buffers = stack_module_state(models)
        flat = torch.stack([self.layout.row(dict(m.named_parameters())) for m in models])
        steps_per_epoch = math.ceil(self.splits.train.shape[0] / c0.batch_size)
        self.members = [Member.start(i, c, self.device, steps_per_epoch)
                        for i, c in enumerate(cfgs)]
        self.per_step = any(m.schedule.name == "onecycle" for m in self.members)
        self.epoch = 0
        self._install(list(range(len(cfgs))), flat, buffers, None)

    def _build(self, cfg: TrialConfig) -> CAE:
        torch.manual_seed(cfg.seed)  # as Trainer: the member's initial weights are its seed's
        model = build_model(cfg.model, seed=cfg.seed)
        return use_masked_dropout(model.to(self.device), cfg.seed)

    # ---- slots: which member each row of the stack holds ---------------------------------
    def _install(self, slots: list[int | None], flat: torch.Tensor, buffers: dict,
                 moments: dict | None, steps: int = 0) -> None:
        """Put ``flat`` (K, P), ``buffers`` and the optimiser's ``moments`` (its state
        tensors by name) in place for ``slots`` (member index per row, None: empty)."""
        self.stack = Stack(self.base, self.layout, flat.detach().clone(), buffers)
        self.opt = BatchedOptimizer(self.cfg.optimizer.name, self.stack.flat)
        for name, value in (moments or {}).items():
            self.opt.buffers[name].copy_(value)
        self.opt.steps = steps
        self._set_slots(slots)
        self.forward = compiler(self.cfg.compile)(self.stack)

    def _set_slots(self, slots: list[int | None]) -> None:
        """Each row's member (None: empty) and the per-row settings that follow from it."""
        self.slots = slots

        def per(f: Callable[[TrialConfig], float]) -> torch.Tensor:
            return torch.tensor([f(self.members[s].cfg) if s is not None else 0.0
                                 for s in slots], dtype=torch.float64, device=self.device)

        self.alive = torch.tensor([s is not None for s in slots], device=self.device)
        self.kinds = [self.members[s].cfg.loss if s is not None else self.cfg.loss
                      for s in slots]  # each row's loss
        cfgs = [self.members[s].cfg if s is not None else None for s in slots]
        self.opt.set(member_settings(cfgs, self._rates(), self.device),
                     clipping=any(c is not None and c.grad_clip for c in cfgs))
        self.coef = {name: per(lambda c, n=name: getattr(c.model, n)).to(self.dtype)
                     for name in ("activity_l1", "activity_l2", "edge_l2")}
        # which penalties any member has, known on the host: no device sync per step
        self.penalties = {name: any(getattr(self.members[s].cfg.model, name)
                                    for s in slots if s is not None) for name in self.coef}

    def _rates(self) -> list[float]:
        """Each row's learning rate now, by its member's schedule (0: an empty row)."""
        return [self.members[s].schedule.lr if s is not None else 0.0 for s in self.slots]

    def live(self) -> list[int]:
        """Indices of the members still training."""
        return [s for s in self.slots if s is not None]

    def _retire(self, leaving: list[int]) -> None:
        """Empty the slots of ``leaving``; shrink the stack when the policy says so."""
        rows = [self.slots.index(i) for i in leaving]
        slots = [None if s in leaving else s for s in self.slots]
        flat = self.stack.flat.detach()
        with torch.no_grad():
            flat[rows] = 0  # an empty row computes finite nothing until the stack shrinks
            for value in self.opt.buffers.values():
                value[rows] = 0
        keep = [r for r, s in enumerate(slots) if s is not None]
        if keep and (self.cfg.compile == "none" or len(keep) <= len(slots) // 2):
            idx = torch.tensor(keep, device=self.device)
            buffers = {k: v[idx] for k, v in self.stack.stacked_buffers().items()}
            moments = {name: value[idx] for name, value in self.opt.buffers.items()}
            self._install([slots[r] for r in keep], flat[idx], buffers, moments, self.opt.steps)
        else:  # same shapes: nothing to recompile
            self._set_slots(slots)

    # ---- one epoch ----------------------------------------------------------------------
    def _penalty(self, z: torch.Tensor) -> torch.Tensor:
        """Each member's activity (on its latents z (K, B, ...)) and edge L2 penalties (K,),
        as ``CAE.penalty`` computes them."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        flat = z.flatten(2).to(dtype)
        total = flat.new_zeros(flat.shape[0])
        c, on = self.coef, self.penalties
        if on["activity_l1"]:
            total = total + c["activity_l1"] * flat.abs().sum(2).mean(1)
        if on["activity_l2"]:
            total = total + c["activity_l2"] * flat.pow(2).sum(2).mean(1)
        if on["edge_l2"]:
            views = self.layout.views(self.stack.flat)
            sq = sum(views[n].pow(2).flatten(1).sum(1) for n in self.edge_names)
            total = total + c["edge_l2"] * sq
        return total

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """The epoch's steps, one at a time: each slot's inputs and targets stacked
        (K, B, ...) and the batch size; each member's from its own order and generator, an
        empty slot's a copy of the first member's (it trains nothing)."""
        train = self.splits.train
        n, bs = train.shape[0], self.cfg.batch_size
        live = [self.members[s] for s in self.slots if s is not None]
        perms = {m.index: batch_order(m.gen, m.cfg.seed, self.epoch, n) for m in live}
        for start in range(0, n, bs):
            own = {}
            for m in live:
                idx = perms[m.index][start:start + bs]
                own[m.index] = self.task.batch(train[idx], idx, m.gen)[:2]
            rows = [own[s] if s is not None else own[live[0].index] for s in self.slots]
            yield (torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows]),
                   min(bs, n - start))

    def train_epoch(self) -> list[float]:
        """One epoch of every slot, each on its member's batches: each slot's mean training
        loss."""
        self.stack.train()
        n = self.splits.train.shape[0]
        total = torch.zeros(len(self.slots), device=self.device, dtype=self.dtype)
        for x, y, size in self._batches():
            mark_step(self.cfg.compile, self.device)
            with autocast(self.precision, self.device):
                z, out = self.forward(x.to(self.dtype))  # (K, B, ...)
            losses = member_losses(self.kinds, out, y).mean(1) + self._penalty(z)  # (K,)
            self.stack.flat.grad = None
            torch.where(self.alive, losses, 0).sum().backward()
            self.opt.step(self.stack.flat, self.stack.flat.grad)
            if self.per_step:
                for s in self.live():
                    self.members[s].schedule.after_step()
                self.opt.set({"lr": torch.tensor(self._rates(), dtype=torch.float64,
                                                 device=self.device)})
            total += losses.detach() * size
        return [t / n for t in total.tolist()]  # the one host sync of the epoch

    def evaluate(self, prepared: tuple, run: Callable | None = None) -> list[dict]:
        """Each slot's errors over a prepared split (``cae.train.loop.evaluate``, as a
        trial's); ``run(x)`` is the stack to evaluate."""
        self.stack.eval()
        run = run or self.forward
        return evaluate(lambda x: run(x.to(self.dtype))[1], prepared, self.task, self.kinds,
                        self.cfg.eval_batch_size,
                        lambda: mark_step(self.cfg.compile, self.device))

    # ---- the run --------------------------------------------------------------------------
    def fit(self, on_epoch: EpochCallback | None = None) -> dict[int, str]:
        """Train until every member has stopped; each member's stop reason.

        After each epoch ``on_epoch(metrics, pack_state)`` gets the metrics of every member
        that trained in it (by index; as ``Trainer``'s, and ``stop_reason`` on a member's
        last epoch) and a function returning :meth:`state_dict`. Members leaving are still
        in the pack then: :meth:`member_state` gives their checkpoints."""
        while self.live():
            t0 = time.perf_counter()
            train = self.train_epoch()
            self.epoch += 1
            val = self.evaluate(self.val)
            elapsed = time.perf_counter() - t0
            metrics, leaving = {}, []
            for row, i in enumerate(self.slots):
                if i is None:
                    continue
                m = metrics[i] = self._member_epoch(self.members[i], row, train[row], val[row])
                m["epoch_time_s"] = elapsed
                if "stop_reason" in m:
                    leaving.append(i)
            self.opt.set({"lr": torch.tensor(self._rates(), dtype=torch.float64,
                                             device=self.device)})
            if self.evaluate_test:
                self._test([i for i in leaving if not self.members[i].error])
            for i, m in metrics.items():
                self.members[i].history.append(m)
            if on_epoch is not None:
                on_epoch(metrics, self.state_dict)
            if leaving:
                self._retire(leaving)
        return {m.index: m.stop_reason for m in self.members}

    def _member_epoch(self, member: Member, row: int, train_loss: float, val: dict) -> dict:
        """One member's epoch by the rule ``Trainer.fit`` follows: its metrics. A member
        that diverges leaves the pack (a trial alone would raise)."""
        member.error = Stopping.divergence(self.epoch, train_loss, val["loss"]) or ""
        if not member.error and member.stopping.update(self.epoch, val["loss"]):
            member.best_state = self._weights(row)
        metrics = member.stopping.metrics(self.epoch, train_loss, val)
        metrics["lr"] = member.schedule.epoch_lr  # its last step's, as a trial's
        if not member.error:
            member.schedule.after_epoch(val["loss"])
        member.stop_reason = "diverged" if member.error else (
            member.stopping.reason(self.epoch) or "")
        if member.stop_reason:
            metrics["stop_reason"] = member.stop_reason
        return metrics

    def _weights(self, row: int) -> dict[str, torch.Tensor]:
        """The state dict (plain ``CAE`` keys, in its order) of the member in ``row``."""
        params = self.layout.views(self.stack.flat.detach()[row:row + 1])
        buffers = self.stack.stacked_buffers()
        return {k: (params[k][0] if k in params else buffers[k][row]).detach().clone()
                for k in self.base.state_dict()}

    def _test(self, indices: list[int]) -> None:
        """Test-split errors of the best weights of ``indices``, into each ``Member.test``."""
        if not indices:
            return
        if self._test_inputs is None:
            self._test_inputs = self.task.eval_inputs(self.splits.test,
                                                      seed=self.cfg.task.eval_seed + 1)
        states = [self.members[i].best_state or self._weights(self.slots.index(i))
                  for i in indices]
        flat = torch.stack([self.layout.row(s) for s in states])
        names = [n for n in self.stack.buffer_names if n in states[0]]
        buffers = {n: torch.stack([s[n] for s in states]) for n in names}
        params = self.layout.views(flat)
        results = self.evaluate(self._test_inputs,
                                run=lambda x: run_stack(self.base, params, buffers, x))
        for i, result in zip(indices, results):
            self.members[i].test = {f"test_{k}": v for k, v in result.items()}

    # ---- checkpoints -----------------------------------------------------------------------
    def member_state(self, index: int) -> dict:
        """Member ``index``'s checkpoint in ``Trainer.state_dict``'s format (loads into a plain
        CAE, its ``torch.optim`` optimiser and schedule); only while it is in the pack (up to
        its last ``on_epoch``)."""
        member, row = self.members[index], self.slots.index(index)
        group = {k: v for k, v in member.stand_in.param_groups[0].items() if k != "params"}
        return trial_checkpoint(
            self._weights(row),
            self.opt.member_state(row, self.layout.names, self.layout.views, group),
            self.epoch, member.stopping, member.best_state, member.history, member.final,
            schedule=member.schedule.state_dict(), pack={"members": len(self.members)})

    def state_dict(self) -> dict:
        """The whole pack, for a resume that continues exactly as if uninterrupted."""
        return {
            "kind": "fused-pack",
            "epoch": self.epoch,
            "slots": list(self.slots),
            "flat": self.stack.flat.detach().clone(),
            "buffers": {k: v.clone() for k, v in self.stack.stacked_buffers().items()},
            **{name: value.clone() for name, value in self.opt.buffers.items()},
            "steps": self.opt.steps,
            "members": [m.record() for m in self.members],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["members"]) != len(self.members):
            raise ValueError(f"the checkpoint holds a pack of {len(state['members'])} members, "
                             f"this pack has {len(self.members)}")
        self.epoch = int(state["epoch"])
        for member, record in zip(self.members, state["members"]):
            member.load(record, self.device)
        buffers = {k: v.to(self.device) for k, v in state["buffers"].items()}
        moments = {name: state[name].to(self.device) for name in BUFFERS[self.opt.name]}
        self._install(list(state["slots"]), state["flat"].to(self.device), buffers, moments,
                      int(state["steps"]))
        # saved during the last epoch of some members: they leave now, as they did then
        leaving = [i for i in self.live() if self.members[i].stop_reason]
        if leaving:
            self._retire(leaving)

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
- **The epochs.** ``cae.train.loop.fit`` runs them, as it runs a ``Trainer``'s: each member
  keeps its own ``Stopping`` rule; a member that stops leaves the pack with its test errors
  measured on its best weights (one that diverges leaves without them), the caller saves
  its checkpoint, and the pack shrinks (at once when eager; under ``compile`` when half the
  slots are empty, so shapes, and compilations, change at most log2(K) times; an empty slot
  meanwhile trains nothing: learning rate 0, zero weights).
- **Checkpoints.** A pack has no checkpoint of its own: :meth:`Pack.member_state` is a
  member's, in ``Trainer``'s format (``cae.train.loop.trial_checkpoint``: it loads into a
  plain ``CAE`` and its ``torch.optim`` optimiser), and :meth:`Pack.load_members` builds a
  pack from any members' checkpoints at one epoch: the same pack resumed exactly, or the
  survivors of several packs regrouped into one (``cae.sweep.packs``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.func import stack_module_state

from cae.config.trial import TrialConfig
from cae.data.datasets import ImageData, load, split, to_device
from cae.model.network import CAE, build_model
from cae.train import loop
from cae.train.hardware import autocast, compiler, mark_step, resolve_device, resolve_precision
from cae.train.loop import (
    Member,
    Stopping,
    batch_order,
    evaluate,
    member_losses,
    trial_checkpoint,
)
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


def _member(index: int, cfg: TrialConfig, device: torch.device, steps_per_epoch: int) -> Member:
    """A pack's member: its learning-rate schedule runs over a stand-in optimiser of its
    trial's kind that holds only the rate, which the pack reads."""
    stand_in = make_optimizer([torch.zeros(1)], cfg)
    schedule = Schedule(stand_in, cfg, steps_per_epoch)
    stand_in.step()  # moves nothing (no gradient); tells torch's schedulers it steps
    return Member(index, cfg, schedule, torch.Generator(device=device), Stopping.of(cfg))


# ---- the pack ----------------------------------------------------------------------------

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
        self._fresh = {k: v.clone() for k, v in buffers.items()}  # every member's at its start
        flat = torch.stack([self.layout.row(dict(m.named_parameters())) for m in models])
        self.steps_per_epoch = math.ceil(self.splits.train.shape[0] / c0.batch_size)
        self.members = [_member(i, c, self.device, self.steps_per_epoch)
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

    def retire(self, leaving: list[int]) -> None:
        """Empty the slots of ``leaving``; shrink the stack when the policy says so."""
        if not leaving:
            return
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
        if self.task.name == "reconstruct":  # input = target, nothing drawn: one gather
            order = torch.stack([perms[s if s is not None else live[0].index]
                                 for s in self.slots])  # (K, n)
            for start in range(0, n, bs):
                idx = order[:, start:start + bs]  # (K, B)
                x = self.task.clean_input(train[idx.reshape(-1)])
                x = x.view(*idx.shape, *x.shape[1:])
                yield x, x, idx.shape[1]
            return
        for start in range(0, n, bs):
            own = {}
            for m in live:
                idx = perms[m.index][start:start + bs]
                own[m.index] = self.task.batch(train[idx], idx, m.gen)[:2]
            rows = [own[s] if s is not None else own[live[0].index] for s in self.slots]
            yield (torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows]),
                   min(bs, n - start))

    def train_epoch(self) -> list[float]:
        """One epoch of every slot, each on its member's batches: each live member's mean
        training loss (in slot order)."""
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
        return self._live_rows([t / n for t in total.tolist()])  # the one host sync

    def _live_rows(self, rows: list) -> list:
        """The entries of ``rows`` (one per slot) of the slots that hold a member."""
        return [row for row, s in zip(rows, self.slots, strict=True) if s is not None]

    def evaluate(self, prepared: tuple) -> list[dict]:
        """Each live member's errors over a prepared split (``cae.train.loop.evaluate``, as a
        trial's), in slot order."""
        return self._live_rows(self._evaluate(prepared, self.forward))

    def _evaluate(self, prepared: tuple, run: Callable) -> list[dict]:
        """Each row's errors when ``run(x)`` is the stack to evaluate."""
        self.stack.eval()
        return evaluate(lambda x: run(x.to(self.dtype))[1], prepared, self.task, self.kinds,
                        self.cfg.eval_batch_size,
                        lambda: mark_step(self.cfg.compile, self.device))

    def rates_changed(self) -> None:
        """Each row's learning rate, as its member's schedule has it after an epoch."""
        self.opt.set({"lr": torch.tensor(self._rates(), dtype=torch.float64,
                                         device=self.device)})

    def weights(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s state dict (plain ``CAE`` keys, in its order)."""
        return self._weights(self.slots.index(index))

    # ---- the run --------------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[dict[int, dict], Callable[[], dict]], None] | None = None,
            until: int | None = None) -> dict[int, str]:
        """Train until every member has stopped (or the pack's epoch reaches ``until``);
        each member's stop reason ("" for one still training): ``cae.train.loop.fit``.

        After each epoch ``on_epoch(metrics, states)`` gets the metrics of every member that
        trained in it (by index; as ``Trainer``'s, and ``stop_reason`` on a member's last
        epoch) and a function returning their checkpoints (:meth:`member_state`) by index."""
        callback = None if on_epoch is None else (lambda metrics: on_epoch(
            metrics, lambda: {i: self.member_state(i) for i in metrics}))
        return loop.fit(self, callback, evaluate_test=self.evaluate_test, until=until)

    def _weights(self, row: int) -> dict[str, torch.Tensor]:
        """The state dict (plain ``CAE`` keys, in its order) of the member in ``row``."""
        params = self.layout.views(self.stack.flat.detach()[row:row + 1])
        buffers = self.stack.stacked_buffers()
        return {k: (params[k][0] if k in params else buffers[k][row]).detach().clone()
                for k in self.base.state_dict()}

    def test(self, indices: list[int]) -> None:
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
        results = self._evaluate(self._test_inputs,
                                 lambda x: run_stack(self.base, params, buffers, x))
        for i, result in zip(indices, results):
            self.members[i].test = {f"test_{k}": v for k, v in result.items()}

    # ---- checkpoints -----------------------------------------------------------------------
    def member_state(self, index: int) -> dict:
        """Member ``index``'s checkpoint in ``Trainer.state_dict``'s format (loads into a plain
        CAE, its ``torch.optim`` optimiser and schedule); only while it is in the pack (up to
        its last ``on_epoch``). ``pack`` says where it trained: the pack's size and its rows
        (members by index, None for an empty one), for an exact resume of this pack."""
        member, row = self.members[index], self.slots.index(index)
        group = {k: v for k, v in member.schedule.optimizer.param_groups[0].items()
                 if k != "params"}
        return trial_checkpoint(
            self._weights(row),
            self.opt.member_state(row, self.layout.names, self.layout.views, group),
            self.epoch, member, pack={"members": len(self.members), "slots": list(self.slots)})

    def load_members(self, states: list[dict | None], slots: list[int | None] | None = None
                     ) -> None:
        """Continue from the members' checkpoints (:meth:`member_state`, or a ``Trainer``'s;
        None: a member that starts afresh, only where none has a checkpoint). The members
        still training must all be at one epoch; those whose checkpoint is their last epoch
        do not train. ``slots``: the rows as they were (an exact resume of a compiled pack
        with empty rows); by default the members still training, in order."""
        if len(states) != len(self.members):
            raise ValueError(f"{len(states)} checkpoints for a pack of {len(self.members)}")
        if not any(states):
            return
        if not all(states):
            raise ValueError("a pack cannot start some members afresh and resume others")
        for member, state in zip(self.members, states):
            member.load(state, self.device)
        live = [m.index for m in self.members if not m.stop_reason]
        epochs = {int(states[i]["epoch"]) for i in live}
        if len(epochs) > 1:
            raise ValueError(f"the members to train are at different epochs ({sorted(epochs)})")
        self.epoch = epochs.pop() if epochs else max(int(s["epoch"]) for s in states)
        present = [s for s in slots or [] if s is not None]
        if not (present and set(live) <= set(present)):  # not the rows of these members
            slots, present = live, live
        if not present:
            self._set_slots([])
            return
        rows = [s if s is not None else present[0] for s in slots]
        flat = torch.stack([self.layout.row(states[i]["model"]) for i in rows]).to(self.device)
        buffers = {name: torch.stack([self._buffer(name, i, states[i]) for i in rows])
                   for name in self.stack.buffer_names}
        moments = {b: torch.stack([self._moments(b, states[i]) for i in rows])
                   for b in BUFFERS[self.opt.name]}
        self._install(list(slots), flat, buffers, moments, self._steps(states[present[0]]))
        empty = [r for r, s in enumerate(slots) if s is None]
        with torch.no_grad():  # an empty row trains nothing, as it did before the resume
            self.stack.flat.detach()[empty] = 0
            for value in self.opt.buffers.values():
                value[empty] = 0
        # members saved in their last epoch leave now, as they did then
        self.retire([i for i in present if self.members[i].stop_reason])

    def _buffer(self, name: str, index: int, state: dict) -> torch.Tensor:
        """Buffer ``name`` of member ``index`` as its checkpoint has it; the dropout layers'
        (not in a state dict) as they start, their step counts where the epoch puts them."""
        if name in state["model"]:
            return state["model"][name].to(self.device)
        value = self._fresh[name][index]
        if name.endswith(".step"):
            return torch.full_like(value, self.epoch * self.steps_per_epoch)
        return value

    def _moments(self, buffer: str, state: dict) -> torch.Tensor:
        """A member's optimiser state ``buffer`` as one flat row (zeros where its torch
        optimiser keeps none: SGD without momentum, or before the first step)."""
        per = state["optimizer"]["state"]
        parts = [per.get(j, per.get(str(j), {})).get(buffer) for j in range(len(
            self.layout.names))]
        return torch.cat([p.reshape(-1).to(self.device, self.dtype) if p is not None else
                          torch.zeros(size, device=self.device, dtype=self.dtype)
                          for p, size in zip(parts, self.layout.sizes)])

    def _steps(self, state: dict) -> int:
        """The optimiser steps taken (Adam's bias correction counts them)."""
        first = state["optimizer"]["state"].get(0, state["optimizer"]["state"].get("0", {}))
        if "step" in first:
            return int(float(first["step"]))
        return self.epoch * self.steps_per_epoch

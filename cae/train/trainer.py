"""One training run in plain PyTorch: epochs, validation, patience, final test evaluation.

No Ray here. ``train`` calls ``on_epoch(metrics, checkpoint)`` after every epoch, which is
how the sweep's trainable reports to Ray Tune and saves checkpoints, and how ``cae train``
prints its lines; ``resume`` continues from such a checkpoint. The data stay on the device
as uint8; batches are indexed, converted and distorted there; losses are summed on the
device and read once per epoch, so there is no host synchronisation per step.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cae.config.trial import SEED_STRIDE, TrialConfig
from cae.data.datasets import ImageData, load, split, to_device
from cae.model.network import CAE, build_model, count_params
from cae.train.tasks import make_task


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix maths in hardware: a CUDA GPU with bf16, or a CPU
    with AVX512-BF16 or AMX (elsewhere bf16 is emulated, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` means bf16 on a CUDA GPU that runs it natively, else fp32.

    Not on the CPU, even with AVX512-BF16: there (2 cores, docs/performance.md) bf16 moved
    single trials' best validation loss by up to 2.5% (peer grid) and 13% (quickstart)
    against fp32, more than the 1% a sweep's answer may move, for sweeps 1.5x and 1.17x
    faster; the best trial stayed the same. ``precision: bf16`` asks for it."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when there is a GPU, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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


def compiler(mode: str) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """What ``compile: none | default | reduce-overhead`` does to a module: nothing, or
    ``torch.compile`` in that mode with static shapes (``reduce-overhead`` records CUDA
    graphs: one per batch shape, so a run has at most two per pass, the full batches and
    the last one)."""
    if mode == "none":
        return lambda m: m
    import torch._dynamo

    # a fused pack compiles once per stack width and batch shape (cae.train.pack): more than
    # dynamo's default 8 variants of one function, after which it would silently run eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return lambda m: torch.compile(m, mode=mode, dynamic=False)


def mark_step(mode: str, device: torch.device) -> None:
    """Tell CUDA graphs a new step begins, so the previous step's outputs may be reused."""
    if mode == "reduce-overhead" and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def autocast(precision: str, device: torch.device):
    """The training forward pass's context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def epoch_metrics(epoch: int, train_loss: float, val: dict, best_val: float,
                  best_epoch: int) -> dict:
    """What a trial (or a pack's member) reports after an epoch; ``best_val_loss`` and
    ``best_epoch`` by the rule its best weights follow (an improvement must beat
    ``min_delta``), which the tables take as the trial's own."""
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
            **{f"val_{k}": v for k, v in val.items() if k != "loss"},
            "best_val_loss": best_val, "best_epoch": best_epoch}


def stop_reason(cfg: TrialConfig, epoch: int, bad_epochs: int) -> str | None:
    """Why a trial stops after ``epoch`` (its patience ran out, or its last epoch), if it
    does."""
    if cfg.patience and bad_epochs >= cfg.patience:
        return "patience"
    return "max_epochs" if epoch >= cfg.max_epochs else None


class Trainer:
    """Holds the model, optimiser, data and task of one run; ``fit`` runs the epochs.

    ``batch_seed`` (default: the trial's seed) seeds the order of the training batches and
    their random distortions; a fused pack's members see the batches of their pack's
    ``batch_seed`` (``cae.train.pack``), and a plain run given the same one sees the same."""

    def __init__(self, cfg: TrialConfig, data: ImageData | None = None,
                 batch_seed: int | None = None):
        self.cfg = cfg
        self.batch_seed = cfg.seed if batch_seed is None else batch_seed
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        data = data if data is not None else load(cfg.data)
        splits = split(data, cfg.data.val_fraction, cfg.data.split_seed)
        self.splits = to_device(splits, self.device)
        self.task = make_task(cfg.task)
        self.model = build_model(cfg.model, seed=cfg.seed).to(self.device)
        self.cuda = self.device.type == "cuda"
        # channels_last is faster for these small convs on CUDA and on the CPU (oneDNN) alike.
        self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = next(self.model.parameters()).dtype  # float64 only in exactness tests
        # Encoder and decoder are compiled separately so the latent stays reachable for
        # the activity penalty.
        wrap = compiler(cfg.compile)
        self.enc, self.dec = wrap(self.model.encoder), wrap(self.model.decoder)
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.gen = torch.Generator(device=self.device)
        # The validation inputs are prepared once, identically for every trial and epoch.
        self.val = self.task.eval_inputs(self.splits.val, seed=cfg.task.eval_seed)
        self.epoch = 0
        self.best_val = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.best_state: dict | None = None
        self.history: list[dict] = []
        self.final: dict | None = None  # the last epoch's metrics, once the run has ended

    # ---- state for checkpoints -----------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly as if uninterrupted: the
        weights, the optimiser, the early-stopping state and the global random state
        (dropout draws from it), on the CPU and on CUDA."""
        rng = {"cpu": torch.get_rng_state()}
        if self.cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "rng": rng,
            "optimizer": self.opt.state_dict(),
            "epoch": self.epoch,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_model": self.best_state,
            "history": self.history,
            "final": self.final,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best_val = float(state["best_val"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.best_state = state.get("best_model")
        self.history = list(state.get("history", []))
        self.final = state.get("final")
        rng = state.get("rng") or {}
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.cuda:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # ---- one epoch ------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=self.dtype, memory_format=torch.channels_last)

    def train_epoch(self) -> float:
        cfg, model = self.cfg, self.model
        model.train()
        train = self.splits.train
        n = train.shape[0]
        self.gen.manual_seed(self.batch_seed * SEED_STRIDE + self.epoch)  # resumable sequence
        perm = torch.randperm(n, generator=self.gen, device=self.device)
        total = torch.zeros((), device=self.device)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            x, y, _ = self.task.batch(train[idx], idx, self.gen)
            mark_step(cfg.compile, self.device)
            with autocast(self.precision, self.device):
                z = self.enc(self._inputs(x))
                out = self.dec(z)
            loss = per_sample_loss(cfg.loss, out, y).mean() + model.penalty(z)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach() * idx.numel()
        return float(total) / n  # the one host sync of the epoch

    @torch.inference_mode()
    def evaluate(self, prepared: tuple) -> dict:
        """Mean loss over a prepared split, per distortion group, and the task's extra
        errors (colorize: in RGB), computed in fp32."""
        x_all, y_all, groups = prepared
        self.model.eval()
        n = x_all.shape[0]
        sums = torch.zeros((), device=self.device, dtype=torch.float64)
        extra: dict[str, torch.Tensor] = {}
        names = self.task.group_names or []
        per_group = torch.zeros(len(names), device=self.device, dtype=torch.float64)
        counts = torch.zeros(len(names), device=self.device, dtype=torch.float64)
        for start in range(0, n, self.cfg.eval_batch_size):
            x = x_all[start : start + self.cfg.eval_batch_size]
            y = y_all[start : start + self.cfg.eval_batch_size]
            # in fp32 whatever the training precision: every trial's (and the baselines')
            # errors are measured alike, and bf16 rounding does not move the ranking
            mark_step(self.cfg.compile, self.device)
            out = self.dec(self.enc(self._inputs(x)))
            losses = per_sample_loss(self.cfg.loss, out, y).double()
            sums += losses.sum()
            if names:
                g = groups[start : start + self.cfg.eval_batch_size]
                per_group.index_add_(0, g, losses)
                counts.index_add_(0, g, torch.ones_like(losses))
            for key, errors in self.task.extra_errors(x, out, y).items():
                extra[key] = extra.get(key, 0.0) + errors.double().sum()
        result = {"loss": float(sums) / n}
        for name, s, c in zip(names, per_group.tolist(), counts.tolist()):
            result[f"loss_{name}"] = s / c if c else math.nan
        result.update({key: float(total) / n for key, total in extra.items()})
        return result

    # ---- the run --------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None) -> str:
        """Train until max_epochs or patience; return the stop reason.

        The last epoch's metrics carry ``stop_reason``, so ``on_epoch`` knows it is the last.
        """
        cfg = self.cfg
        if cfg.patience and self.bad_epochs >= cfg.patience:
            return "patience"  # resumed from the checkpoint of a run that had already ended
        while self.epoch < cfg.max_epochs:
            t0 = time.perf_counter()
            train_loss = self.train_epoch()
            self.epoch += 1
            if not math.isfinite(train_loss):
                raise Diverged(f"train loss became {train_loss} at epoch {self.epoch}")
            val = self.evaluate(self.val)
            if not math.isfinite(val["loss"]):
                raise Diverged(f"val loss became {val['loss']} at epoch {self.epoch}")
            if val["loss"] < self.best_val - cfg.min_delta:
                self.best_val, self.best_epoch, self.bad_epochs = val["loss"], self.epoch, 0
                self.best_state = copy.deepcopy(self.model.state_dict())
            else:
                self.bad_epochs += 1
            metrics = epoch_metrics(self.epoch, train_loss, val, self.best_val,
                                    self.best_epoch)
            metrics["epoch_time_s"] = time.perf_counter() - t0
            stop = stop_reason(cfg, self.epoch, self.bad_epochs)
            if stop:
                metrics["stop_reason"] = stop
            self.history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics, self.state_dict)
            if stop:
                return stop
        return "max_epochs"

    def test(self) -> dict:
        """Test-split errors of the best (by validation) weights; the model keeps its own
        (last epoch's) weights afterwards, so a checkpoint saved later says what it holds."""
        current = None
        if self.best_state is not None:
            current = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.best_state)
        try:
            prepared = self.task.eval_inputs(self.splits.test, seed=self.cfg.task.eval_seed + 1)
            return {f"test_{k}": v for k, v in self.evaluate(prepared).items()}
        finally:
            if current is not None:
                self.model.load_state_dict(current)


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
    dict: the run continues after its epoch.
    """
    trainer = Trainer(cfg, data)
    if resume is not None:
        trainer.load_state_dict(resume)
    reason = trainer.fit(on_epoch)
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
    if evaluate_test:
        result.test = trainer.test()
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

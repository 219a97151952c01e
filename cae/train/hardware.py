"""Where and how a trial computes: the device, the precision, ``torch.compile`` and CUDA
graphs. One answer for a single trial and for a pack, so both run alike."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix maths in hardware: a CUDA GPU with bf16, or a CPU
    with AVX512-BF16 or AMX (elsewhere bf16 is emulated, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` means bf16 on a CUDA GPU that runs it natively, else fp32.

    Not on the CPU, even with AVX512-BF16: there bf16 moved single trials' best validation
    loss by more than the 1% a sweep's answer may move (docs/performance.md), for a modest
    speed-up; ``precision: bf16`` asks for it."""
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


def compiler(mode: str) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """What ``compile: none | default | reduce-overhead`` does to a module: nothing, or
    ``torch.compile`` in that mode with static shapes (``reduce-overhead`` records CUDA
    graphs: one per batch shape, so a run has at most two per pass, the full batches and
    the last one)."""
    if mode == "none":
        return lambda m: m
    import torch._dynamo

    # a fused pack compiles once per stack width and batch shape (cae.train.pack): more
    # than dynamo's default 8 variants of one function, after which it would run eager
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

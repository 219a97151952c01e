"""Stacked models: the tensors and operations of a fused pack (``cae.train.pack``).

K copies of one CAE become one flat ``(K, P)`` parameter and ``(K, ...)`` buffers
(:class:`Layout`, :class:`Stack`), run side by side with ``torch.func.vmap``
(:func:`run_stack`); :class:`MaskedDropout` gives every member (and every plain trial) its
own dropout masks, reproducibly. ``cae.train.optimizers`` steps the stack.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, vmap

from cae.model.network import CAE

# ---- dropout that a plain run can reproduce -----------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (``lowbias32``) of int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_bits(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32` in place on an int32 tensor that holds 32-bit patterns: the same bits,
    at half the memory traffic of int64 (products wrap modulo 2**32 as the mask above
    does; a right shift is made logical by masking off the copied sign bits)."""
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x846CA68B - 2**32  # the same multiplier, as an int32
    x ^= (x >> 16) & 0xFFFF
    return x


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """An int64 tensor of values < 2**32 as int32 tensors of the same 32 bits."""
    return (((x + 2**31) & _M32) - 2**31).to(torch.int32)


class MaskedDropout(nn.Module):
    """Inverted dropout whose mask is a hash of (seed, layer, step, element index).

    ``rate``, ``step`` and what the seed and the layer make of the stream (``base``) are
    buffers, so under vmap each member has its own rate and stream; ``step`` counts
    training calls. Not persistent: not in the state dict. ``base`` (from the seed and the
    layer alone) and ``threshold`` (from the rate alone) are hashed once, at construction;
    each call
    hashes the step into it and every element on int32 in place (:func:`_mix32_bits`): the
    masks of the int64 hash, bit for bit (tested), at a fraction of its cost."""

    def __init__(self, rate: float, seed: int, layer: int):
        super().__init__()
        self.layer = layer
        self.register_buffer("rate", torch.tensor(float(rate)), persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64), persistent=False)
        seed_t = torch.tensor(int(seed), dtype=torch.int64)
        base = _mix32(_mix32((seed_t & _M32) ^ _mix32((seed_t >> 32) & _M32)) ^ layer)
        self.register_buffer("base", _as_int32(base), persistent=False)
        # keep an element when its 24 bits * 2**-24 >= rate, in integers: rate * 2**24 is
        # exact in float32
        self.register_buffer("threshold", torch.ceil(self.rate * 2.0**24).to(torch.int32),
                             persistent=False)
        # a model in channels_last (a plain trial's) gets its masks in that layout too: a
        # mask in the other layout turns the gradient's layout and slows the convolution's
        # backward (not known under vmap, where a pack's activations are contiguous)
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        key = _mix32_bits(self.base ^ self.step.to(torch.int32))  # the step's low 32 bits
        self.step.add_(1)
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int32).view(x.shape)
        if self.channels_last and x.dim() == 4:
            index = index.contiguous(memory_format=torch.channels_last)  # the same values
        bits = _mix32_bits(index + key)  # (index + key) mod 2**32, hashed
        bits ^= key
        bits = (_mix32_bits(bits) >> 8) & 0xFFFFFF  # 24 random bits
        return x * ((bits >= self.threshold) / (1 - self.rate)).to(x.dtype)


def set_dropout_step(model: nn.Module, step: int) -> None:
    """Set every :class:`MaskedDropout` of ``model`` to its mask stream's ``step`` (the
    training steps taken so far): a resumed trial draws the masks it would have drawn."""
    for layer in model.modules():
        if isinstance(layer, MaskedDropout):
            layer.step.fill_(step)


def masks_channels_last(model: nn.Module) -> nn.Module:
    """Draw every :class:`MaskedDropout` mask of ``model`` in the channels_last layout (the
    same values), for a model whose activations are in that layout."""
    for layer in model.modules():
        if isinstance(layer, MaskedDropout):
            layer.channels_last = True
    return model


def use_masked_dropout(model: CAE, seed: int) -> CAE:
    """Replace the model's ``nn.Dropout`` layers by :class:`MaskedDropout` with the same
    rates and ``seed`` (in place; the state dict's keys do not change)."""
    for part, offset in ((model.encoder, 0), (model.decoder, 1000)):
        for i, layer in enumerate(part):
            if isinstance(layer, nn.Dropout):
                device = next(model.parameters()).device
                part[i] = MaskedDropout(layer.p, seed, offset + i).to(device)
    return model


# ---- the stack ------------------------------------------------------------------------------


class Layout:
    """Where each parameter of one CAE lives in a flat row of P numbers."""

    def __init__(self, model: nn.Module):
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)

    def row(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """One member's parameters (by name) as a flat (P,) row."""
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(K, P) -> each parameter as a (K, *shape) view of it."""
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[:, start:start + size].view(flat.shape[0], *shape)
            start += size
        return out


class Stack(nn.Module):
    """The pack's tensors, flat weights (K, P) and stacked buffers, and the vmapped CAE:
    ``forward(x)`` runs every member on its own inputs ``x`` (K, B, C, H, W) and returns
    the latents (K, B, ...) and outputs (K, B, C', H, W)."""

    def __init__(self, base: CAE, layout: Layout, flat: torch.Tensor,
                 buffers: dict[str, torch.Tensor]):
        super().__init__()
        self._base = (base,)  # a tuple, so not a submodule: only its structure is used
        self.layout = layout
        self.flat = nn.Parameter(flat)
        self.buffer_names = list(buffers)
        for name, value in buffers.items():
            self.register_buffer(name.replace(".", "__"), value)

    def stacked_buffers(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n.replace(".", "__")) for n in self.buffer_names}

    def train(self, mode: bool = True) -> Stack:
        self._base[0].train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run_stack(self._base[0], self.layout.views(self.flat), self.stacked_buffers(), x)


def run_stack(base: CAE, params: dict, buffers: dict, x: torch.Tensor):
    """The CAE ``base`` (its structure and train/eval mode) with each member's tensors, on
    each member's inputs ``x`` (K, B, ...), or on inputs shared by all (B, ...): (latents
    (K, B, ...), outputs (K, B, ...))."""
    state = {**params, **buffers}
    enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}

    def one(enc_state: dict, dec_state: dict, x: torch.Tensor):
        z = functional_call(base.encoder, enc_state, (x,))
        return z, functional_call(base.decoder, dec_state, (z,))

    own = x.dim() == 5  # (K, B, C, H, W): each member its own images
    return vmap(one, in_dims=(0, 0, 0 if own else None), randomness="different")(enc, dec, x)

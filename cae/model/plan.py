"""Architecture arithmetic without torch: shapes, layers, parameter counts.

``plan`` walks the architecture with integer arithmetic only, so an impossible configuration
is refused with a message naming the layer before anything is built, and the latent size and
parameter count of every grid point of a large sweep are known in microseconds (a dry run of
10,000 points does not import torch). ``cae.model.network`` builds the modules from ``layers``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cae.config.trial import ModelConfig

# --------------------------------------------------------------------------------------
# Shape arithmetic


@dataclass
class Plan:
    """Sizes along the encoder: what each stage takes and gives, and the latent."""

    input_shape: tuple[int, int, int]
    stage_in: list[int] = field(default_factory=list)  # spatial size entering each stage
    stage_out: list[int] = field(default_factory=list)  # spatial size leaving each stage
    feature_shape: tuple[int, int, int] = (0, 0, 0)  # last feature map (after latent conv)
    latent_size: int = 0


def _pad(padding: int | str, kernel: int, where: str) -> int:
    if padding == "same":
        if kernel % 2 == 0:
            raise ValueError(
                f"{where}: padding 'same' needs an odd kernel (got {kernel}); "
                "give padding as an integer"
            )
        return kernel // 2
    return int(padding)


def _conv_out(w: int, k: int, p: int, s: int, where: str) -> int:
    """Output width of a conv: (W - K + 2P) / S + 1, refusing kernels larger than the input."""
    if k > w + 2 * p:
        raise ValueError(f"{where}: kernel {k} is larger than its input {w}x{w} (padding {p})")
    return (w - k + 2 * p) // s + 1


def plan(cfg: ModelConfig) -> Plan:
    """Check the architecture and derive its sizes, or raise ValueError naming the layer."""
    if cfg.in_channels is None or cfg.image_size is None:
        raise ValueError("model input shape unknown: set in_channels and image_size")
    size, chans = cfg.image_size, cfg.in_channels
    out = Plan(input_shape=(chans, size, size))
    for i, (ch, n, pool) in enumerate(zip(cfg.channels, cfg.stage_convs, cfg.stage_pools)):
        out.stage_in.append(size)
        p = _pad(cfg.padding, cfg.kernel, f"model.padding (stage {i})")
        for j in range(n):
            size = _conv_out(size, cfg.kernel, p, cfg.stride, f"model.kernel: stage {i} conv {j}")
        if pool:
            if size < 2:
                raise ValueError(
                    f"model.pool: stage {i} pools a {size}x{size} map; "
                    f"a {cfg.image_size}x{cfg.image_size} input allows fewer pools"
                )
            size //= 2
        out.stage_out.append(size)
        chans = ch
    if cfg.latent_channels is not None:
        k = cfg.latent_kernel or cfg.kernel
        p = _pad(cfg.latent_padding if cfg.latent_padding is not None else cfg.padding, k,
                 "model.latent_padding")
        size = _conv_out(size, k, p, 1, "model.latent_kernel: latent conv")
        chans = cfg.latent_channels
    out.feature_shape = (chans, size, size)
    input_size = cfg.in_channels * cfg.image_size**2
    if cfg.bottleneck == "conv":
        out.latent_size = chans * size * size  # C * ((W - K + 2P) / S + 1)^2
    else:
        out.latent_size = int(cfg.latent_dim)
    if out.latent_size > input_size and not cfg.allow_overcomplete:
        raise ValueError(
            f"model latent size {out.latent_size} is larger than the input "
            f"({cfg.in_channels}x{cfg.image_size}x{cfg.image_size} = {input_size}); "
            "set allow_overcomplete: true if that is intended"
        )
    return out


# --------------------------------------------------------------------------------------
# Layers: small frozen specs, the one description of the architecture. ``cae.model.network``
# instantiates them (one dispatch that raises on an unknown kind); ``param_count`` sums them.


@dataclass(frozen=True)
class Conv:
    """A 2-D convolution (``transpose``: a ConvTranspose2d of the same shape arithmetic)."""

    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    transpose: bool = False

    @property
    def params(self) -> int:
        return self.cin * self.cout * self.kernel**2 + self.cout


@dataclass(frozen=True)
class Linear:
    fin: int
    fout: int

    @property
    def params(self) -> int:
        return self.fin * self.fout + self.fout


@dataclass(frozen=True)
class BatchNorm:
    channels: int

    @property
    def params(self) -> int:
        return 2 * self.channels  # weight and bias; running statistics are buffers


@dataclass(frozen=True)
class Activation:
    """The hidden activation, or the output activation when ``output``."""

    output: bool = False
    params = 0


@dataclass(frozen=True)
class Dropout:
    """``where``: ``edge`` (first/last conv), ``stage`` (after a pool), ``dense``."""

    rate: float
    where: str
    params = 0


@dataclass(frozen=True)
class Pool:
    """2x2 max-pool: (B, C, H, W) -> (B, C, H/2, W/2)."""

    params = 0


@dataclass(frozen=True)
class Upsample:
    """Nearest-neighbour upsampling to ``size`` x ``size``."""

    size: int
    params = 0


@dataclass(frozen=True)
class Flatten:
    """(B, C, H, W) -> (B, C*H*W)."""

    params = 0


@dataclass(frozen=True)
class Unflatten:
    """(B, C*H*W) -> (B, C, H, W)."""

    shape: tuple[int, int, int]
    params = 0


Layer = Conv | Linear | BatchNorm | Activation | Dropout | Pool | Upsample | Flatten | Unflatten


def _encoder(cfg: ModelConfig, rng: random.Random) -> tuple[list[Layer], int]:
    """The encoder's stages (and the latent conv), and the channels they end with."""
    enc: list[Layer] = []
    chans = cfg.in_channels
    for i, (ch, n, pool) in enumerate(zip(cfg.channels, cfg.stage_convs, cfg.stage_pools)):
        p = _pad(cfg.padding, cfg.kernel, "")
        for j in range(n):
            enc += [Conv(chans, ch, cfg.kernel, cfg.stride, p), Activation()]
            chans = ch
            if i == 0 and j == 0 and cfg.edge_dropout:
                enc.append(Dropout(cfg.edge_dropout, "edge"))
        if pool:
            enc.append(Pool())  # (B, C, H/2, W/2)
        if cfg.batchnorm:
            enc.append(BatchNorm(ch))
        rate = cfg.dropout
        if rate and cfg.dropout_std:  # drawn once per layer from normal(dropout, dropout_std)
            rate = min(max(rng.gauss(rate, cfg.dropout_std), 0.0), 0.9)
        if rate > 0:
            enc.append(Dropout(rate, "stage"))
    if cfg.latent_channels is not None:
        k = cfg.latent_kernel or cfg.kernel
        p = _pad(cfg.latent_padding if cfg.latent_padding is not None else cfg.padding, k, "")
        enc += [Conv(chans, cfg.latent_channels, k, 1, p), Activation()]
        chans = cfg.latent_channels
    return enc, chans


def _dense(cfg: ModelConfig, feature: tuple[int, int, int]) -> tuple[list[Layer], list[Layer]]:
    """A dense bottleneck: flatten, the dense stack, ``latent_dim``; then the mirror back
    to a feature map of ``reshape_channels`` (else the encoder's channels)."""
    fc, fh, fw = feature
    enc: list[Layer] = [Flatten()]  # (B, C*H*W)
    widths = [fc * fh * fw, *cfg.dense]
    for a, b in pairwise(widths):
        enc += [Linear(a, b), Activation()]
        if cfg.dense_dropout:
            enc.append(Dropout(cfg.dense_dropout, "dense"))
    enc.append(Linear(widths[-1], cfg.latent_dim))  # (B, latent_dim)
    rc = cfg.reshape_channels or fc
    back = [cfg.latent_dim, *reversed(cfg.dense)]
    if back[-1] != rc * fh * fw:
        back.append(rc * fh * fw)
    pairs = list(pairwise(back))
    dec: list[Layer] = []
    for pos, (a, b) in enumerate(pairs):
        dec += [Linear(a, b), Activation()]
        if cfg.dense_dropout and pos < len(pairs) - 1:  # none before the reshape
            dec.append(Dropout(cfg.dense_dropout, "dense"))
    dec.append(Unflatten((rc, fh, fw)))  # (B, rc, H, W)
    return enc, dec


def _decoder(cfg: ModelConfig, p_: Plan, chans: int, size: int) -> list[Layer]:
    """The encoder's stages mirrored: batchnorm, upsample back to each stage's input size,
    its convs; then the output conv."""
    kd = cfg.decoder_k
    transpose = cfg.decoder == "conv_transpose"
    dec: list[Layer] = []
    for i in reversed(range(len(cfg.channels))):
        if cfg.batchnorm:
            dec.append(BatchNorm(chans))
        target = p_.stage_in[i]
        if size != target:
            dec.append(Upsample(target))  # (B, C, H', W') back to the stage's input size
            size = target
        for j in range(cfg.stage_convs[i]):
            is_output = i == 0 and j == cfg.stage_convs[i] - 1 and not cfg.output_conv
            if is_output and cfg.edge_dropout:
                dec.append(Dropout(cfg.edge_dropout, "edge"))
            ch = cfg.out_channels if is_output else cfg.channels[i]
            dec += [Conv(chans, ch, kd, 1, kd // 2, transpose), Activation(output=is_output)]
            chans = ch
    if size != cfg.image_size:
        dec.append(Upsample(cfg.image_size))
    if cfg.output_conv:
        if cfg.edge_dropout:
            dec.append(Dropout(cfg.edge_dropout, "edge"))
        dec += [Conv(chans, cfg.out_channels, kd, 1, kd // 2, transpose), Activation(output=True)]
    return dec


_LAYERS_CACHE: dict[tuple[str, int], tuple[tuple[Layer, ...], tuple[Layer, ...]]] = {}


def layers(cfg: ModelConfig, seed: int = 0) -> tuple[list[Layer], list[Layer]]:
    """The encoder's and decoder's layers, the one description of the architecture:
    ``CAE`` instantiates it and ``param_count`` sums it without building. Remembered per
    architecture (the layers are frozen): a 10,000-point dry run asks each several times."""
    key = (cfg.model_dump_json(), seed)
    if key not in _LAYERS_CACHE:
        if len(_LAYERS_CACHE) >= 4096:
            _LAYERS_CACHE.clear()
        enc, dec = _layers(cfg, seed)
        _LAYERS_CACHE[key] = (tuple(enc), tuple(dec))
    enc_t, dec_t = _LAYERS_CACHE[key]
    return list(enc_t), list(dec_t)


def _layers(cfg: ModelConfig, seed: int) -> tuple[list[Layer], list[Layer]]:
    p_ = plan(cfg)
    enc, chans = _encoder(cfg, random.Random(seed))
    dec: list[Layer] = []
    if cfg.bottleneck == "dense":
        to_latent, from_latent = _dense(cfg, p_.feature_shape)
        enc, dec = enc + to_latent, from_latent
        chans = cfg.reshape_channels or p_.feature_shape[0]
    return enc, dec + _decoder(cfg, p_, chans, p_.feature_shape[1])


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameters of the architecture, summed from its layers without building."""
    return sum(layer.params for part in layers(cfg) for layer in part)


def describe(cfg: ModelConfig) -> dict:
    """Params and latent size of an architecture, without building it."""
    p = plan(cfg)
    params = param_count(cfg)
    return {
        "input_shape": list(p.input_shape),
        "latent_shape": list(p.feature_shape) if cfg.bottleneck == "conv" else [cfg.latent_dim],
        "latent_size": p.latent_size,
        "params": params,
        "compression": round(math.prod(p.input_shape) / p.latent_size, 3),
    }

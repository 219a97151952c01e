"""Architecture arithmetic without torch: shapes, layers, parameter counts, presets.

``plan`` walks the architecture with integer arithmetic only, so an impossible configuration
is refused with a message naming the layer before anything is built, and the latent size and
parameter count of every grid point of a large sweep are known in microseconds (a dry run of
10,000 points does not import torch). ``cae.models`` builds the modules from ``layers``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from itertools import pairwise

from cae.config import ModelConfig

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
# Layers

Layer = tuple  # ("conv", cin, cout, k, s, p), ("linear", a, b), ("bn", c), ("act",), ...


def layers(cfg: ModelConfig, seed: int = 0) -> tuple[list[Layer], list[Layer]]:
    """The encoder's and decoder's layers as plain tuples, the one description of the
    architecture: ``CAE`` instantiates it and ``param_count`` sums it without building."""
    p_ = plan(cfg)
    rng = random.Random(seed)
    enc: list[Layer] = []
    chans = cfg.in_channels
    for i, (ch, n, pool) in enumerate(zip(cfg.channels, cfg.stage_convs, cfg.stage_pools)):
        p = _pad(cfg.padding, cfg.kernel, "")
        for j in range(n):
            enc += [("conv", chans, ch, cfg.kernel, cfg.stride, p), ("act",)]
            chans = ch
            if i == 0 and j == 0 and cfg.edge_dropout:
                enc.append(("dropout", cfg.edge_dropout))
        if pool:
            enc.append(("pool",))  # (B, C, H/2, W/2)
        if cfg.batchnorm:
            enc.append(("bn", ch))
        rate = cfg.dropout
        if rate and cfg.dropout_std:  # drawn once per layer from normal(dropout, dropout_std)
            rate = min(max(rng.gauss(rate, cfg.dropout_std), 0.0), 0.9)
        if rate > 0:
            enc.append(("dropout", rate, "stage"))
    if cfg.latent_channels is not None:
        k = cfg.latent_kernel or cfg.kernel
        p = _pad(cfg.latent_padding if cfg.latent_padding is not None else cfg.padding, k, "")
        enc += [("conv", chans, cfg.latent_channels, k, 1, p), ("act",)]
        chans = cfg.latent_channels
    fc, fh, fw = p_.feature_shape
    dec: list[Layer] = []
    if cfg.bottleneck == "dense":
        widths = [fc * fh * fw, *cfg.dense]
        enc.append(("flatten",))  # (B, C*H*W)
        for a, b in pairwise(widths):
            enc += [("linear", a, b), ("act",)]
            if cfg.dense_dropout:
                enc.append(("dropout", cfg.dense_dropout))
        enc.append(("linear", widths[-1], cfg.latent_dim))  # (B, latent_dim)
        rc = cfg.reshape_channels or fc
        back = [cfg.latent_dim, *reversed(cfg.dense)]
        if back[-1] != rc * fh * fw:
            back.append(rc * fh * fw)
        for a, b in pairwise(back):
            dec += [("linear", a, b), ("act",)]
            if cfg.dense_dropout and b != back[-1]:
                dec.append(("dropout", cfg.dense_dropout))
        dec.append(("unflatten", (rc, fh, fw)))  # (B, rc, H, W)
        chans = rc
    kd = cfg.decoder_k
    conv = "conv" if cfg.decoder == "upsample_conv" else "convT"
    size = fh
    for i in reversed(range(len(cfg.channels))):
        if cfg.batchnorm:
            dec.append(("bn", chans))
        target = p_.stage_in[i]
        if size != target:
            dec.append(("up", target))  # (B, C, H', W') back to the stage's input size
            size = target
        for j in range(cfg.stage_convs[i]):
            is_output = i == 0 and j == cfg.stage_convs[i] - 1 and not cfg.output_conv
            if is_output and cfg.edge_dropout:
                dec.append(("dropout", cfg.edge_dropout))
            ch = cfg.out_channels if is_output else cfg.channels[i]
            dec += [(conv, chans, ch, kd, 1, kd // 2), ("out_act",) if is_output else ("act",)]
            chans = ch
    if size != cfg.image_size:
        dec.append(("up", cfg.image_size))
    if cfg.output_conv:
        if cfg.edge_dropout:
            dec.append(("dropout", cfg.edge_dropout))
        dec += [(conv, chans, cfg.out_channels, kd, 1, kd // 2), ("out_act",)]
    return enc, dec


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameters of the architecture, summed from its layers without building."""
    total = 0
    for layer in (l for part in layers(cfg) for l in part):
        kind = layer[0]
        if kind in ("conv", "convT"):
            _, cin, cout, k = layer[:4]
            total += cin * cout * k * k + cout
        elif kind == "linear":
            total += layer[1] * layer[2] + layer[2]
        elif kind == "bn":
            total += 2 * layer[1]
    return total


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



# --------------------------------------------------------------------------------------
# Presets: small named configs. The seeds' models first (exact parameter counts).

_CIFAR = {"in_channels": 3, "out_channels": 3, "image_size": 32}
_GRAY28 = {"in_channels": 1, "out_channels": 1, "image_size": 28}
_STUDY_A = {
    **_CIFAR, "channels": [8, 12], "kernel": 3, "padding": 1, "bottleneck": "conv",
    "latent_channels": 16,
    "output_conv": False, "output_activation": "sigmoid",
}

PRESETS: dict[str, dict] = {
    # Study A (CIFAR-10): 3->8 pool, 8->12 pool, 12->16 latent 8x8x16; up 16->12, up 12->3.
    "study_a_default": dict(_STUDY_A),
    # One pool fewer: the latent stays 16x16 with 12 channels (as large as the input).
    "study_a_fewer_layers": {**_STUDY_A, "channels": [8], "latent_channels": 12},
    # More channels in the latent conv: 128 x 8 x 8 (overcomplete, as the study compared).
    "study_a_more_channels": {**_STUDY_A, "latent_channels": 128, "allow_overcomplete": True},
    # 5x5 filters; stage convs keep their size, the latent conv has padding 1: 16 x 6 x 6.
    "study_a_larger_filters": {
        **_STUDY_A, "kernel": 5, "padding": 2, "latent_kernel": 5, "latent_padding": 1,
        "decoder_kernel": 5,
    },
    # Study A's colorization model: Y in, CbCr out; 42,338 parameters. Its 64 x 8 x 8 latent
    # is larger than the Y input, which is harmless here: the target is not the input.
    "study_a_colorize": {
        "in_channels": 1, "out_channels": 2, "image_size": 32, "channels": [16, 32],
        "kernel": 3, "padding": 1, "bottleneck": "conv", "latent_channels": 64,
        "output_conv": False,
        "allow_overcomplete": True,
    },
    # Study B's final "model 12" (Kuzushiji-MNIST denoising): 107,877 parameters, latent 8.
    "study_b_model12": {
        **_GRAY28, "channels": [32, 16], "convs": [3, 4], "kernel": 3, "padding": 1,
        "batchnorm": True, "bottleneck": "dense", "dense": [49, 40, 30, 20, 10],
        "latent_dim": 8, "reshape_channels": 1, "decoder": "conv_transpose",
        "output_conv": True, "output_activation": "linear", "init": "he_uniform",
    },
    # Small dense-bottleneck CAEs for 28x28 grayscale images.
    "dense_tiny": {
        **_GRAY28, "channels": [8, 16], "bottleneck": "dense", "dense": [64], "latent_dim": 8,
    },
    "dense_small": {
        **_GRAY28, "channels": [16, 32], "bottleneck": "dense", "dense": [128],
        "latent_dim": 16,
    },
    "dense_deep": {
        **_GRAY28, "channels": [32, 16], "convs": 2, "batchnorm": True, "bottleneck": "dense",
        "dense": [64, 32], "latent_dim": 8, "init": "he_uniform",
    },
    # A small conv-bottleneck CAE for 28x28: latent 4 x 7 x 7 = 196.
    "conv_small": {**_GRAY28, "channels": [16, 32], "bottleneck": "conv", "latent_channels": 4},
}


def preset_dict(name: str) -> dict:
    """The fields of a named preset, with ``preset`` set to its name (validation copies the
    lists, so a shallow copy is enough)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return {"preset": name, **PRESETS[name]}


def get_preset(name: str) -> ModelConfig:
    """A named preset as a validated ModelConfig."""
    return ModelConfig.model_validate(preset_dict(name))

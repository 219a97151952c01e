"""The CAE builder: one ModelConfig -> one ``nn.Module``; shape arithmetic; named presets.

``plan`` walks the architecture with integer arithmetic only (no tensors), so an impossible
configuration is refused with a message naming the layer before anything is built, and the
latent size of every grid point of a sweep is known in microseconds. ``build_model`` builds
the module; the tests check that the planned latent size equals the real tensor's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

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
# The module

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


class CAE(nn.Module):
    """A convolutional autoencoder: ``encode`` to the latent, ``decode`` back to an image."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.plan = plan(cfg)
        gen = torch.Generator().manual_seed(seed)
        act = _ACTIVATIONS[cfg.activation]
        enc: list[nn.Module] = []
        self.dropout_rates: list[float] = []
        chans = cfg.in_channels
        for i, (ch, n, pool) in enumerate(zip(cfg.channels, cfg.stage_convs, cfg.stage_pools)):
            p = _pad(cfg.padding, cfg.kernel, "")
            for j in range(n):
                enc += [nn.Conv2d(chans, ch, cfg.kernel, cfg.stride, p), act()]
                chans = ch
                if i == 0 and j == 0 and cfg.edge_dropout:
                    enc.append(nn.Dropout(cfg.edge_dropout))
            if pool:
                enc.append(nn.MaxPool2d(2))  # (B, C, H/2, W/2)
            if cfg.batchnorm:
                enc.append(nn.BatchNorm2d(ch))
            rate = self._dropout_rate(gen)
            if rate > 0:
                enc.append(nn.Dropout(rate))
        if cfg.latent_channels is not None:
            k = cfg.latent_kernel or cfg.kernel
            p = _pad(cfg.latent_padding if cfg.latent_padding is not None else cfg.padding, k, "")
            enc += [nn.Conv2d(chans, cfg.latent_channels, k, 1, p), act()]
            chans = cfg.latent_channels
        fc, fh, fw = self.plan.feature_shape
        dec: list[nn.Module] = []
        if cfg.bottleneck == "dense":
            widths = [fc * fh * fw, *cfg.dense]
            enc.append(nn.Flatten())  # (B, C*H*W)
            for a, b in zip(widths[:-1], widths[1:]):
                enc += [nn.Linear(a, b), act()]
                if cfg.dense_dropout:
                    enc.append(nn.Dropout(cfg.dense_dropout))
            enc.append(nn.Linear(widths[-1], cfg.latent_dim))  # (B, latent_dim)
            rc = cfg.reshape_channels or fc
            back = [cfg.latent_dim, *reversed(cfg.dense)]
            if back[-1] != rc * fh * fw:
                back.append(rc * fh * fw)
            for a, b in zip(back[:-1], back[1:]):
                dec += [nn.Linear(a, b), act()]
                if cfg.dense_dropout and b != back[-1]:
                    dec.append(nn.Dropout(cfg.dense_dropout))
            dec.append(nn.Unflatten(1, (rc, fh, fw)))  # (B, rc, H, W)
            chans = rc
        self.encoder = nn.Sequential(*enc)

        kd = cfg.decoder_k
        conv = nn.Conv2d if cfg.decoder == "upsample_conv" else nn.ConvTranspose2d
        size = fh
        n_stages = len(cfg.channels)
        for i in reversed(range(n_stages)):
            if cfg.batchnorm:
                dec.append(nn.BatchNorm2d(chans))
            target = self.plan.stage_in[i]
            if size != target:
                dec.append(nn.Upsample(size=(target, target), mode="nearest"))  # (B, C, H', W')
                size = target
            for j in range(cfg.stage_convs[i]):
                is_output = i == 0 and j == cfg.stage_convs[i] - 1 and not cfg.output_conv
                if is_output and cfg.edge_dropout:
                    dec.append(nn.Dropout(cfg.edge_dropout))
                ch = cfg.out_channels if is_output else cfg.channels[i]
                dec.append(conv(chans, ch, kd, 1, kd // 2))
                dec.append(self._output_act() if is_output else act())
                chans = ch
        if size != cfg.image_size:  # only when stage 0 kept its size and the latent conv did not
            dec.append(nn.Upsample(size=(cfg.image_size, cfg.image_size), mode="nearest"))
        if cfg.output_conv:
            if cfg.edge_dropout:
                dec.append(nn.Dropout(cfg.edge_dropout))
            dec += [conv(chans, cfg.out_channels, kd, 1, kd // 2), self._output_act()]
        self.decoder = nn.Sequential(*dec)
        self._init_weights(cfg.init)
        convs = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        self._edges = (convs[0], convs[-1])

    def _dropout_rate(self, gen: torch.Generator) -> float:
        """The stage's dropout: fixed, or drawn once from normal(dropout, dropout_std)."""
        rate = self.cfg.dropout
        if rate and self.cfg.dropout_std:
            rate = rate + self.cfg.dropout_std * float(torch.randn((), generator=gen, device="cpu"))
            rate = min(max(rate, 0.0), 0.9)
        if rate:
            self.dropout_rates.append(rate)
        return rate

    def _output_act(self) -> nn.Module:
        return nn.Sigmoid() if self.cfg.output_activation == "sigmoid" else nn.Identity()

    def _init_weights(self, scheme: str) -> None:
        if scheme == "default":
            return
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                if scheme == "he_uniform":  # Keras he_uniform: U(+-sqrt(6 / fan_in))
                    nn.init.kaiming_uniform_(m.weight, a=0.0, nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, C, H, W) -> latent (B, C', H', W') or (B, latent_dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # latent -> (B, out_channels, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def penalty(self, z: torch.Tensor) -> torch.Tensor:
        """Regularisation terms added to the loss: activity L1/L2 on the latent (summed per
        sample, averaged over the batch, as Keras does) and L2 on the first and last conv."""
        cfg = self.cfg
        total = z.new_zeros(())
        flat = z.flatten(1).float()
        if cfg.activity_l1:
            total = total + cfg.activity_l1 * flat.abs().sum(1).mean()
        if cfg.activity_l2:
            total = total + cfg.activity_l2 * flat.pow(2).sum(1).mean()
        if cfg.edge_l2:
            total = total + cfg.edge_l2 * sum(m.weight.pow(2).sum() for m in self._edges)
        return total


def build_model(cfg: ModelConfig, seed: int = 0) -> CAE:
    """Build the CAE a ModelConfig describes (shapes must be resolved, see TrialConfig)."""
    return CAE(cfg, seed=seed)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (batchnorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(cfg: ModelConfig) -> dict:
    """Params and latent size of an architecture (builds it once on the CPU)."""
    p = plan(cfg)
    with torch.device("meta"):
        params = count_params(CAE(cfg))
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
    **_CIFAR, "channels": [8, 12], "kernel": 3, "padding": 1, "latent_channels": 16,
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
        "kernel": 3, "padding": 1, "latent_channels": 64, "output_conv": False,
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
    "conv_small": {**_GRAY28, "channels": [16, 32], "latent_channels": 4},
}


def preset_dict(name: str) -> dict:
    """The fields of a named preset (a fresh copy), with ``preset`` set to its name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return {"preset": name, **copy.deepcopy(PRESETS[name])}


def get_preset(name: str) -> ModelConfig:
    return ModelConfig.model_validate(preset_dict(name))

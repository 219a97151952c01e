"""The CAE builder: one ModelConfig -> one ``nn.Module``.

The architecture itself (shapes, layers, parameter counts, presets) is computed in
``cae.model.plan`` without torch; this module instantiates those layers. The tests check that the
planned latent size and parameter count equal the real module's.
"""

from __future__ import annotations

import torch
from torch import nn

from cae.config.presets import PRESETS, preset_dict  # noqa: F401 (re-exported)
from cae.config.trial import ModelConfig, get_preset  # noqa: F401 (re-exported)
from cae.model import plan as arch
from cae.model.plan import Layer, Plan, describe, layers, param_count, plan  # noqa: F401 (re-exported)

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
        enc, dec = layers(cfg, seed)
        self.dropout_rates = [layer.rate for layer in enc
                              if isinstance(layer, arch.Dropout) and layer.where == "stage"]
        self.encoder = nn.Sequential(*map(self._module, enc))
        self.decoder = nn.Sequential(*map(self._module, dec))
        self._init_weights(cfg.init)
        convs = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        self._edges = (convs[0], convs[-1])

    def _module(self, layer: Layer) -> nn.Module:
        match layer:
            case arch.Conv(cin, cout, k, s, p, transpose):
                return (nn.ConvTranspose2d if transpose else nn.Conv2d)(cin, cout, k, s, p)
            case arch.Linear(fin, fout):
                return nn.Linear(fin, fout)
            case arch.BatchNorm(channels):
                return nn.BatchNorm2d(channels)
            case arch.Activation(output=True):
                return self._output_act()
            case arch.Activation():
                return _ACTIVATIONS[self.cfg.activation]()
            case arch.Dropout(rate):
                return nn.Dropout(rate)
            case arch.Pool():
                return nn.MaxPool2d(2)
            case arch.Upsample(size):
                return nn.Upsample(size=(size, size), mode="nearest")
            case arch.Flatten():
                return nn.Flatten()
            case arch.Unflatten(shape):
                return nn.Unflatten(1, shape)
        raise TypeError(f"no module for layer {layer!r}")

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
        flat = z.flatten(1).to(torch.promote_types(z.dtype, torch.float32))  # fp64 stays
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


def presets_table(as_json: bool = False) -> str:
    """``cae models``: every named preset with its input, bottleneck, params and latent."""
    import json

    rows = []
    for name in PRESETS:
        cfg = get_preset(name)
        rows.append({"name": name, "bottleneck": cfg.bottleneck, **describe(cfg)})
    if as_json:
        return json.dumps(rows, indent=2)
    lines = [f"{'name':24} {'input':>10} {'bottleneck':>10} {'params':>10} {'latent':>8}"]
    for r in rows:
        shape = "x".join(str(s) for s in r["input_shape"])
        lines.append(f"{r['name']:24} {shape:>10} {r['bottleneck']:>10} {r['params']:>10,} "
                     f"{r['latent_size']:>8}")
    return "\n".join(lines)

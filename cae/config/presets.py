"""Named presets: small model configs, the seeds' models first (exact parameter counts).

A preset is a plain dict of ``ModelConfig`` fields; ``model: {preset: NAME, ...}`` in a spec
starts from it and overrides the fields given beside it. Torch-free and import-free, so
configs can read it without cycles.
"""

from __future__ import annotations

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

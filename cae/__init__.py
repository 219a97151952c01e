"""cae-sweep: hyperparameter sweeps of convolutional autoencoders on Ray Tune.

``from cae import load_model`` gives a trained model out of a run (``cae.export``); it is
imported on first use, so ``import cae`` stays light (no torch).
"""

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from cae.export import load_model

        return load_model
    raise AttributeError(f"module 'cae' has no attribute {name!r}")

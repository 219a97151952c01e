"""cae-sweep: hyperparameter sweeps of convolutional autoencoders on Ray Tune.

``from cae import load_model`` gives a trained model out of a run (``cae.export``);
``from cae import load_runs`` reads several runs side by side for a comparison
(``cae.report.compare``). Both are imported on first use, so ``import cae`` stays light (no
torch).
"""

from typing import Any

__all__ = ["load_model", "load_runs"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from cae.export import load_model

        return load_model
    if name == "load_runs":
        from cae.report.compare import load_runs

        return load_runs
    raise AttributeError(f"module 'cae' has no attribute {name!r}")

"""The Ray Tune function trainable: one trial of a sweep around ``cae.train.Trainer``.

Each epoch it reports the losses to Ray Tune with a checkpoint (model, optimiser, epoch,
early-stopping state, and the epochs so far as JSON for ``cae.results``); a restarted trial
continues from its last checkpoint. The final epoch's report also carries the test errors
and the stop reason, because a scheduler may end the trial right after its last report. A
trial that diverges raises, so Ray Tune marks it as an error with that reason and the sweep
goes on.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from cae.config import trial_config
from cae.data import ImageData
from cae.rundir import HISTORY_FILE
from cae.train import Trainer

STATE_FILE = "state.pt"


def _load_state(checkpoint: tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, weights_only=True, map_location="cpu")


def run_trial(point: dict, base: dict, datasets: dict[str, ImageData], threads: int = 1) -> None:
    """Train one trial, reporting every epoch to Ray Tune (used with tune.with_parameters).

    ``datasets`` holds every dataset of the sweep by ``DataConfig.source_key``; the trial
    takes the one its own config names."""
    torch.set_num_threads(max(1, threads))
    cfg = trial_config(base, point)
    key = cfg.data.source_key()
    if key not in datasets:  # check_spec loads every grid value: a bug if this happens
        raise RuntimeError(f"no dataset loaded for {key}; loaded: {', '.join(datasets)}")
    data = datasets[key]
    state = _load_state(tune.get_checkpoint())
    if state is not None and state.get("final"):
        tune.report(state["final"])  # finished before an interruption: nothing to redo
        return
    trainer = Trainer(cfg, data)
    if state is not None:
        trainer.load_state_dict(state)
    static = {
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "latent_size": trainer.model.plan.latent_size,
        "device": str(trainer.device),
        "precision": trainer.precision,
        "data_loaded": f"{data.name}: {tuple(data.train.shape)} train images",
        "node_id": ray.get_runtime_context().get_node_id(),
    }

    def on_epoch(metrics: dict, state_fn) -> None:
        report = {**metrics, **static}
        if "stop_reason" in metrics:  # the last epoch of this trial
            state = state_fn()  # saved before test() swaps in the best weights
            report.update(trainer.test())
            state["final"] = report
        else:
            state = state_fn()
        history = {"epochs": trainer.history, "static": static, "final": state.get("final")}
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            (Path(d) / HISTORY_FILE).write_text(json.dumps(history, default=float))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    trainer.fit(on_epoch)

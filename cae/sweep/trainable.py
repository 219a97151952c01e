"""The Ray Tune function trainable: one trial of a sweep around ``cae.train.trainer.Trainer``.

When it first starts, a trial writes its record (``cae.run.record``: the configuration it runs,
every default filled in) into its directory of the run; restarted, it goes on with that
configuration. Each epoch it reports the losses to Ray Tune with a checkpoint (model,
optimiser, epoch, early-stopping and random state, and the epochs so far as JSON for
``cae.results.tables``). The final epoch's report also carries the test errors and the stop
reason, because a scheduler may end the trial right after its last report. A trial that
diverges raises, so Ray Tune marks it as an error with that reason and the sweep goes on.

A restarted trial goes on from the newest checkpoint in its directory that can be read
whole (``cae.run.checkpoints``), which after a restore from an older state can be newer than
the one Tune hands it: it then first reports that checkpoint's last epoch again, so that the
scheduler decides on it as if nothing had happened. A trial of a rebuilt run takes over the
directory of the earlier trial with its search-space point (``adopt``). A trial of
``cae extend`` takes over a finished trial of another run the same way (``adopt`` names it
in full): it starts from that trial's newest checkpoint, the last epoch's whole state (a
trial trained to ``max_epochs`` while still improving ends on its best epoch), trains on to
its own, higher ``max_epochs``, and its record says which trial it ``extends``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from cae.config.points import trial_config
from cae.config.trial import TrialConfig
from cae.data.datasets import ImageData
from cae.run import checkpoints
from cae.run.directory import write_file
from cae.run.record import RECORD_FILE, make_record, trial_config_of
from cae.run.state import point_key
from cae.sweep import internals
from cae.sweep.extension import read_sources
from cae.train.trainer import Trainer


def here_and_source(run_dir: str, point: dict, adopt: dict[str, str] | None) -> tuple[str, str]:
    """This trial's directory, and the one it goes on from: its own, or, when it has no
    checkpoint yet and ``adopt`` names an earlier directory for its point, that one: a
    directory of this run (a run whose state was lost, ``cae.run.state.orphans``), or by
    its full path or URI a trial of another run that this one trains on (``cae extend``)."""
    here = f"{run_dir.rstrip('/')}/{internals.trial_dir_name()}"
    adopt = {**read_sources(run_dir), **(adopt or {})}  # cae extend's sources, if any
    if point_key(point) in adopt and not checkpoints.list_checkpoints(
            *checkpoints.filesystem(here)):
        where = adopt[point_key(point)]
        outside = "://" in where or where.startswith("/")
        return here, where if outside else f"{run_dir.rstrip('/')}/{where}"
    return here, here


def extension_of(run_dir: str, source: str) -> str | None:
    """How the record of a trial names the trial of another run it trains on: relative to
    the storage the two runs share (``<run>/<trial dir>``), else in full; None for a source
    in this run."""
    run_dir = run_dir.rstrip("/")
    if source.startswith(run_dir + "/"):
        return None
    storage = run_dir.rsplit("/", 1)[0] + "/"
    return source.removeprefix(storage) if source.startswith(storage) else source


def extended(found: checkpoints.Found, cfg: TrialConfig) -> checkpoints.Found:
    """A finished trial's newest checkpoint made the start of its extension: no final
    report (it trains on to ``cfg.max_epochs``), its last epoch no longer its end, and a
    fresh patience where it had run out (an extension of a trial stopped by patience gets
    ``patience`` epochs to improve)."""
    state = dict(found.state, final=None)
    history = [dict(h) for h in state.get("history") or []]
    if history:
        history[-1].pop("stop_reason", None)
    state["history"] = history
    if cfg.patience and int(state.get("bad_epochs", 0)) >= cfg.patience:
        state["bad_epochs"] = 0
    return checkpoints.Found(found.path, state, {**found.history, "epochs": history,
                                                  "final": None}, found.skipped)


def static_facts(runner, data: ImageData) -> dict:
    """What every report of a trial (or a pack) carries: where and how it trains."""
    return {
        "device": str(runner.device),
        "precision": runner.precision,
        "data_loaded": f"{data.name}: {tuple(data.train.shape)} train images",
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def read_record(location: str) -> dict | None:
    """The record a trial (or a pack's member) wrote in ``location`` at its first start."""
    fs, path = checkpoints.filesystem(location)
    try:
        with fs.open_input_stream(f"{path}/{RECORD_FILE}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def recorded_config(here: str, source: str, current: TrialConfig, point: dict, *,
                    depth: int = 1, extra: dict | None = None,
                    files: dict[str, bytes] | None = None) -> TrialConfig:
    """The configuration a trial runs: the record of its first start (in its own directory
    ``here``, or in ``source``, the one it takes over), else ``current``, recorded now with
    ``extra`` keys, after ``files`` are written beside it. A record taken over names the
    trial it ``continues`` by the last ``depth`` parts of ``source`` (a pack's member: 2)."""
    record = read_record(here)
    if record is None:
        record = (read_record(source) if source != here else None) or make_record(current,
                                                                                  point)
        if source != here:  # the tables then leave the trial taken over out
            record["continues"] = "/".join(source.rstrip("/").rsplit("/", depth)[-depth:])
        record.update(extra or {})
        for name, data in (files or {}).items():
            write_file(here, name, data)
        write_file(here, RECORD_FILE, json.dumps(record).encode())
    # where the data are read from may differ on a resume (cae resume --data-dir)
    return trial_config_of(record, {}, point, current.data.data_dir)


def _ray_epoch() -> int:
    """The last epoch of the checkpoint Tune hands this trial (0 for none)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    history = checkpoints.read_history(checkpoint.filesystem, checkpoint.path)
    return checkpoints.epoch_of(history or {})


def report_epoch(metrics: dict, state: dict, history: dict) -> None:
    """Report ``metrics`` to Tune with a checkpoint of the weights and the trial's history
    (its epochs, kept beside state.pt since result.json can lose rows on a restart)."""
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / checkpoints.STATE_FILE)
        (Path(d) / checkpoints.HISTORY_FILE).write_text(json.dumps(history, default=float))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def go_on(found: checkpoints.Found | None, here: str, source: str, epochs: list[dict],
          static: dict) -> bool:
    """What a trial (or a pack) reports before it trains on from ``found``, its newest
    checkpoint, whose epochs so far are ``epochs``. True when it had already finished
    before an interruption: nothing is left to train.

    When Tune's view is behind (a restore from an older state, a torn newest checkpoint, a
    trial taken over from ``source``), the last epoch is reported again first, so that the
    scheduler decides on it before any new one; a trial taken over also keeps its history
    in its own directory."""
    if found is None:
        return False
    if found.state.get("final"):
        if source == here:
            tune.report(found.state["final"])
        else:
            report_epoch(found.state["final"], found.state, found.history)
        return True
    if source != here or found.skipped or checkpoints.epoch_of(found.history) > _ray_epoch():
        note = {}
        if source != here or found.skipped:
            where = found.name if source == here else f"{found.path.rsplit('/', 2)[-2]}/" \
                f"{found.name}"
            skipped = f" ({'; '.join(found.skipped)})" if found.skipped else ""
            note = {"resumed_from": f"{where}{skipped}"}
        report_epoch({**epochs[-1], **static, **note, "reported_again": True}, found.state,
                     {"epochs": epochs, "static": static, "final": None})
    return False


def run_trial(point: dict, base: dict, datasets: dict[str, ImageData], run_dir: str,
              adopt: dict[str, str] | None = None, threads: int = 1) -> None:
    """Train one trial, reporting every epoch to Ray Tune (used with tune.with_parameters).

    ``datasets`` holds every dataset of the sweep by ``DataConfig.source_key``; the trial
    takes the one its own config names. ``run_dir`` is the run directory (a path or a URI);
    ``adopt`` maps search-space points to directories of a rebuilt run's earlier trials."""
    torch.set_num_threads(max(1, threads))
    current = trial_config(base, point)
    key = current.data.source_key()
    if key not in datasets:  # check_spec loads every grid value: a bug if this happens
        raise RuntimeError(f"no dataset loaded for {key}; loaded: {', '.join(datasets)}")
    here, source = here_and_source(run_dir, point, adopt)
    found = checkpoints.load_newest(*checkpoints.filesystem(source))
    extends = extension_of(run_dir, source)
    if extends is None:
        cfg = recorded_config(here, source, current, point)
    elif found is None:  # cae extend checked that it had one: it went since
        raise RuntimeError(f"{source}: no whole checkpoint left to train on from")
    else:  # cae extend: this run's point says what it runs, the old trial where it starts
        cfg = recorded_config(here, here, current, point, extra={
            "extends": extends, "extended_at": int(found.state["epoch"])})
        found = extended(found, cfg)
    trainer = Trainer(cfg, datasets[key])
    static = static_facts(trainer, datasets[key])
    if found is not None and not found.state.get("final"):
        trainer.load_state_dict(found.state)
    if go_on(found, here, source, trainer.history, static):
        return

    def on_epoch(metrics: dict, state_fn) -> None:
        report = {**metrics, **static}
        state = state_fn()  # saved before test() swaps in the best weights
        if "stop_reason" in metrics:  # the last epoch of this trial
            report.update(trainer.test())
            state["final"] = report
        report_epoch(report, state, {"epochs": trainer.history, "static": static,
                                     "final": state.get("final")})

    trainer.fit(on_epoch)

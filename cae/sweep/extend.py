"""``cae extend RUN_DIR --epochs N``: train chosen trials of a finished run on, as a new run.

A sweep is cut by its budget, and a winner still improving at ``max_epochs`` may lose its
place with more epochs (``cae.results.learning``). Extending makes a new run directory
(beside the old one, or under ``--storage``) whose trials are the chosen ones (the best by
default, the best at each value of ``--best-per COLUMN``, or ``--trial ID ...``), each
starting from its newest checkpoint: the last epoch's whole state (weights, optimiser,
learning-rate schedule, random state, early-stopping counters; for a trial that ran to
``max_epochs`` while improving, that is its best epoch), training ``N`` more epochs under
its own patience. The trial's record names the trial it ``extends`` and the epoch it took
over at; its epochs table holds the old epochs and the new ones, one curve.

The new run's spec is the old one with a grid of ``variant`` mappings, one per chosen
trial: the settings in which that trial's recorded configuration differs from the base
trial, ``max_epochs`` raised; so the spec says what each trial runs, and the trial's
configuration is exactly the old one but for its length. The run directory's
``extends.json`` maps each point to its source, and the trainable (``cae.sweep.trainable``)
starts the point from there as a resume starts from a trial's own checkpoint (on a
``cae resume`` of the new run too). Continuing gives the losses that training that long in
the first place gives. A fused run's trials go on fused (FIFO), each pack from its
members' checkpoints, where the trials that could share a pack reached the same epoch;
else each trains on alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from cae.config.errors import UserError
from cae.config.points import apply_point, trial_config
from cae.config.spec import SweepSpec
from cae.config.trial import TrialConfig
from cae.run import checkpoints
from cae.run import directory as rundir
from cae.run.outcomes import unfinished_mask
from cae.run.record import trial_config_of
from cae.run.state import point_key
from cae.sweep.extension import write_sources

# Schedules whose shape is fixed by max_epochs: raising it changes every epoch's rate
# (onecycle cannot even step past its planned steps), so the extension would not continue
# the trial it names.
FIXED_LENGTH_SCHEDULES = ("cosine", "onecycle")


@dataclass
class Source:
    """One chosen trial: its row, where it lies, its configuration and last epoch."""

    row: pd.Series
    location: str
    config: TrialConfig
    epoch: int

    @property
    def label(self) -> str:
        return str(self.row["trial_id"]).rsplit("_", 1)[-1]


def dotted_diff(target: dict, have: dict, prefix: str = "") -> dict:
    """The dotted keys whose values in ``target`` differ from ``have`` (nested mappings
    compared key by key)."""
    out = {}
    for key, value in target.items():
        has = isinstance(have, dict) and key in have
        other = have[key] if has else None
        if isinstance(value, dict) and value and isinstance(other, dict):
            out.update(dotted_diff(value, other, f"{prefix}{key}."))
        elif not has or value != other:
            out[f"{prefix}{key}"] = value
    return out


def _sources(run_dir: str, chosen: list[pd.Series], data_dir: str | None) -> list[Source]:
    """The chosen trials, checked: ended, not failed, a schedule that can go on, and a
    checkpoint to start from."""
    from cae.results.tables import read_trial

    local = rundir.local_copy(run_dir)
    base = rundir.read_spec(local).get("trial") or {}
    out, seen = [], set()
    for row in chosen:
        name = str(row["trial_dir"])
        if name in seen:
            continue
        seen.add(name)
        label = str(row["trial_id"])
        if bool(unfinished_mask(row.to_frame().T).iloc[0]):
            raise UserError(f"trial {label} has not finished: continue the run with `cae "
                            f"resume {run_dir}` first")
        if str(row["stop_reason"]).startswith("error"):
            raise UserError(f"trial {label} failed ({row['stop_reason']}): nothing to extend")
        files = read_trial(local / name, outcome=False)
        cfg = trial_config_of(files.record, base, files.point, data_dir)
        if cfg.schedule.name in FIXED_LENGTH_SCHEDULES:
            raise UserError(f"trial {label} ran the {cfg.schedule.name} schedule, whose shape "
                            "is fixed by its max_epochs: an extension would not continue it "
                            "(extend trials of a constant, step or plateau schedule)")
        location = f"{run_dir.rstrip('/')}/{name}"
        epoch = checkpoints.epoch_of(checkpoints.newest_history(location))
        if not epoch:
            raise UserError(f"trial {label}: no whole checkpoint in {location}")
        out.append(Source(row, location, cfg, epoch))
    return out


def _point(base: dict, target: dict) -> dict:
    """The variant mapping that turns the base trial into ``target`` (checked)."""
    try:
        have = trial_config(base, {}).model_dump(mode="json")
    except (ValueError, UserError):  # a base completed only by its points
        have = {}
    for mapping in (dotted_diff(target, have), dotted_diff(target, {})):
        if trial_config(base, {"variant": mapping}).model_dump(mode="json") == target:
            return mapping
    raise RuntimeError("the extension's configuration cannot be written as a point")


def extension_spec(old: SweepSpec, sources: list[Source],
                   epochs: int) -> tuple[SweepSpec, dict[str, str], dict[str, int]]:
    """The new run's spec, its points' sources (``adopt``: point key -> location) and the
    epochs each source had trained (``carried``: point key -> epochs)."""
    # the old space's fixed values belong to every trial: into the base, out of the points
    base = apply_point(copy.deepcopy(old.trial), {k: v for k, (kind, v) in old.axes().items()
                                                  if kind == "fixed"})
    lengths = {s.epoch + epochs for s in sources}
    if len(lengths) == 1:
        base["max_epochs"] = lengths.pop()
    mappings, adopt, carried = [], {}, {}
    for s in sources:
        target = s.config.model_dump(mode="json")
        target["max_epochs"] = s.epoch + epochs
        mapping = _point(base, target)
        mappings.append(mapping)
        adopt[point_key({"variant": mapping})] = s.location
        carried[point_key({"variant": mapping})] = s.epoch
    data = old.model_dump(mode="json")
    data.update(name=f"{old.name}-extend", trial=base,
                space={"variant": {"grid": mappings}}, scheduler={"kind": "fifo"},
                search={"kind": "grid"}, num_samples=1,
                fuse=data.get("fuse") if _fusable(sources) else None)
    return SweepSpec.model_validate(data), adopt, carried


def _fusable(sources: list[Source]) -> bool:
    """Whether the chosen trials of a fused run can go on fused: a pack trains its members
    from one epoch, so trials that could share a pack must have reached the same one."""
    from cae.train.packing import pack_key

    start: dict[str, set[int]] = {}
    for s in sources:
        start.setdefault(pack_key(s.config), set()).add(s.epoch)
    return all(len(epochs) == 1 for epochs in start.values())


def extend_run(run_dir: str, epochs: int, *, best_per: str | None = None,
               trial_ids: list[str] | None = None, name: str | None = None,
               storage: str | None = None, address: str | None = None,
               data_dir: str | None = None, force: bool = False, console=None) -> int:
    """``cae extend``: a new run training the chosen trials of ``run_dir`` ``epochs`` more
    epochs each; returns the sweep's exit status."""
    from cae.export import read_trials, select_many
    from cae.sweep import driver

    if epochs < 1:
        raise UserError(f"--epochs {epochs}: extend by at least one epoch")
    run_dir = rundir.storage_uri(run_dir)
    old = rundir.load_run_spec(run_dir)
    trials, _ = read_trials(run_dir)
    sources = _sources(run_dir, select_many(trials, best_per, trial_ids), data_dir)
    spec, adopt, carried = extension_spec(old, sources, epochs)
    spec.storage = storage or run_dir.rstrip("/").rsplit("/", 1)[0]
    name = name or f"{run_dir.rstrip('/').rsplit('/', 1)[-1]}-extend-" \
                   f"{datetime.now():%Y%m%d-%H%M%S}"
    new_dir = f"{rundir.storage_uri(spec.storage).rstrip('/')}/{name}"
    if rundir.is_uri(new_dir) or not (rundir.local_path(new_dir) / rundir.SPEC_FILE).is_file():
        write_sources(new_dir, adopt, carried, epochs)  # where its trials start, on a resume too
    for s in sources:
        print(f"extending trial {s.label} ({s.row['trial_dir']}): from epoch {s.epoch} to "
              f"{s.epoch + epochs}", flush=True)
    return driver.new_sweep(spec, name, address=address, data_dir=data_dir, force=force,
                            console=console)

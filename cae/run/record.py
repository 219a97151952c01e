"""What a trial is, fixed when it starts: its record, and the table columns made from it.

When a trial starts it writes ``trial.json`` into its directory of the run: the validated
configuration it runs with (every default filled in), the search-space point it came from,
its parameter count, latent size and architecture family. ``cae.results.tables`` builds the config
columns of ``trials.parquet`` from it, so the tables of a run keep saying what that run
trained after cae's defaults change; a restarted trial goes on with its recorded
configuration. Trials that have not started have no record: their columns are made from the
spec with this cae's defaults (what they will run), and say so (``recorded`` False).
:func:`trial_config_of` is the one answer to "which configuration did this trial run" for
every reader of a run (the tables, the reference errors, the report's pictures, export).

Torch-free, like ``cae.config.trial``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cae.config.optim import OptimizerConfig, ScheduleConfig
from cae.config.points import REPEAT_KEY, trial_config
from cae.config.trial import TrialConfig
from cae.model.plan import describe

RECORD_FILE = "trial.json"


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested settings as flat dotted columns; lists and mappings as JSON text."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def family(cfg: TrialConfig) -> str:
    """The architecture family: bottleneck kind, stages and convolutions per stage."""
    m = cfg.model
    convs = m.convs if isinstance(m.convs, int) else "-".join(map(str, m.convs))
    return f"{m.bottleneck} {len(m.channels)} stages x {convs} conv"


def config_id(dump: dict) -> str:
    """Trials that differ by their seed alone (the repeats of one configuration) share it.

    Settings added to TrialConfig later count only away from their defaults, so that a
    configuration keeps its id across cae versions (the default is what trials ran before
    the setting existed)."""
    unseeded = {k: v for k, v in dump.items()
                if k != "seed" and not (k in _ADDED and v == _ADDED[k])}
    return hashlib.sha1(json.dumps(unseeded, sort_keys=True).encode()).hexdigest()[:10]


# TrialConfig's settings added after config ids were first written, at their defaults
_ADDED = {"optimizer": OptimizerConfig().model_dump(mode="json"),
          "schedule": ScheduleConfig().model_dump(mode="json"), "grad_clip": None}


def make_record(cfg: TrialConfig, point: dict[str, Any]) -> dict:
    """The record of a trial about to run ``cfg`` for the search-space ``point``."""
    dump = cfg.model_dump(mode="json")
    info = describe(cfg.model)
    return {"config": dump, "point": point, "config_id": config_id(dump),
            "params": info["params"], "latent_size": info["latent_size"],
            "family": family(cfg)}


def columns(record: dict, recorded: bool = True) -> dict:
    """The flat columns of one trial: every setting it ran with, its point's ``repeat`` and
    ``variant*`` values (``variant.*`` columns name a variant's settings), params, latent
    size, family and config id; ``recorded`` says whether they come from the trial's own
    record."""
    point = record.get("point") or {}
    return {
        "repeat": int(point.get(REPEAT_KEY, 0)),
        **flatten(record["config"]),
        **{k: v for k, v in flatten(point).items() if k.startswith("variant")},
        "config_id": record["config_id"], "params": record["params"],
        "latent_size": record["latent_size"], "family": record["family"],
        "recorded": recorded,
    }


def trial_config_of(record: dict | None, base: dict, point: dict,
                    data_dir: str | None = None) -> TrialConfig:
    """The configuration a trial ran: the one its ``record`` (written at its first start)
    says; without a record (a trial that has not started) the one it will run, its
    ``point`` applied to the run's ``base`` trial with this cae's defaults.

    ``data_dir`` (``cae resume --data-dir``, ``cae report --data-dir``) replaces where the
    data are read from: the same images in another place, so the rest of what the trial ran
    stays as recorded."""
    if record is None:
        planned = trial_config(base, point)
        if not data_dir:
            return planned
        config = planned.model_dump(mode="json")
    else:
        config = dict(record["config"])
    if data_dir:
        config["data"] = {**config["data"],
                          "data_dir": str(Path(data_dir).expanduser().resolve())}
    return TrialConfig.model_validate(config)


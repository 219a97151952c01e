"""Grid points: a search-space point (dotted keys) applied to a base trial, and ``--set``.

A sweep's base trial is a plain mapping (``SweepSpec.trial``); each point of its space sets
dotted keys in it (``model.latent_dim``), a ``variant*`` key several at once, and
:func:`trial_config` validates the result. A point's ``repeat`` is not a setting: it is the
repeat's number among ``num_samples`` over a grid, and shifts the seed.
"""

from __future__ import annotations

import copy
from typing import Any

from cae.config.errors import UserError
from cae.config.trial import SEED_STRIDE, TrialConfig

# A point's ``repeat`` (0, 1, ... num_samples - 1 over a grid) shifts the trial's seed by
# this stride, so repeats of one configuration differ by seed and nothing else.
REPEAT_KEY, REPEAT_SEED_STRIDE = "repeat", SEED_STRIDE


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"``, creating dicts on the way."""
    parts = key.split(".")
    if not isinstance(data, dict) or not all(parts):
        raise UserError(f"cannot set {key!r}: keys are dotted names inside a mapping")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def apply_point(data: dict, point: dict[str, Any]) -> dict:
    """Apply one search-space point to a trial dict, in place.

    Keys are dotted trial keys; a key starting with ``variant`` holds a mapping of dotted
    keys applied together (so one grid axis can pair, say, a model preset with its task).
    """
    for key, value in point.items():
        if key.startswith("variant"):
            if not isinstance(value, dict):
                raise UserError(f"{key}: each value must be a mapping of dotted keys")
            for k, v in value.items():
                set_dotted(data, k, v)
        else:
            set_dotted(data, key, value)
    return data


def trial_config(base: dict, point: dict[str, Any]) -> TrialConfig:
    """The base trial with one search-space point (dotted keys) applied, validated.

    A ``repeat`` entry of the point (see ``cae.sweep.tuner.param_space``) is not a
    setting: repeat ``r`` runs with ``seed + r * REPEAT_SEED_STRIDE``."""
    point = dict(point)
    repeat = point.pop(REPEAT_KEY, 0)
    data = apply_point(copy.deepcopy(base), point)
    if repeat:
        if not isinstance(data.get("seed", 0), int):
            return TrialConfig.model_validate(data)  # the validation error names the seed
        data["seed"] = data.get("seed", 0) + int(repeat) * REPEAT_SEED_STRIDE
    return TrialConfig.model_validate(data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into ``{"a.b": 3, "c": [1, 2]}`` (values parsed as
    YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key.strip()}: the value is not valid YAML ({exc})") from None
    return out

"""Config files: a YAML mapping read with a clear error, and a trial loaded from one.

(A sweep's spec file is loaded by ``cae.config.spec.load_spec``, through :func:`load_yaml`.)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cae.config.errors import UserError, validate
from cae.config.points import parse_overrides, set_dotted
from cae.config.trial import TrialConfig


def load_yaml(path: str) -> dict:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_trial(path: str, overrides: list[str] | None = None) -> TrialConfig:
    """Load a trial YAML file, apply ``--set key=value`` overrides, validate."""
    data = load_yaml(path)
    data.pop("name", None)
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(data, key, value)
    return validate(TrialConfig, data, path)

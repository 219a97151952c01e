"""Config files: a YAML mapping read with a clear error, and a trial loaded from one.

(A sweep's spec file is loaded by ``cae.config.spec.load_spec``, through :func:`load_yaml`.)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cae.config.errors import UserError, validate
from cae.config.points import parse_overrides, set_dotted
from cae.config.trial import TrialConfig


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: PyYAML keeps the
    last one without a word, so a spec with two ``space:`` blocks would sweep only the
    second."""


def _unique_mapping(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:  # its own keys (a merged '<<' key may be overridden)
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            twice = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the mapping's own constructor says so
            continue
        if twice:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"the key {key!r} is written twice",
                key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str) -> dict:
    """Read a YAML mapping, with a clear error for a missing, empty or malformed file or a
    key written twice."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeys)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc}") from None
    if data is None:
        raise UserError(f"{path} is empty: it holds no settings (a mapping such as "
                        "'trial: ...' and 'space: ...')")
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

"""A run directory as the figures see it: the two frames, the spec, and the swept axes.

The figures never read files; they take the ``trials`` and ``epochs`` frames of
``cae.results.tables`` plus the sweep spec (a plain dict, as dumped into ``spec.yaml``). This module
loads those three and answers the questions every figure asks: which columns are the swept
axes, how to label an axis value, which error to rank by, which trials are the best, which
colour belongs to which architecture family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# Plotly's default qualitative palette, then Dark24's first colours: families stay apart.
PALETTE = (
    "#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880",
    "#FF97FF", "#FECB52", "#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A",
)


@dataclass
class Run:
    """One sweep's results: ``trials`` and ``epochs`` frames and the resolved spec."""

    trials: pd.DataFrame
    epochs: pd.DataFrame
    spec: dict = field(default_factory=dict)
    path: Path | None = None
    baselines: pd.DataFrame | None = None  # cae.results.baselines' reference errors, if written
    notes: list[str] = field(default_factory=list)  # what the reader should be told
    data_dir: str | None = None  # where the pictures read the dataset, if not where it ran

    @property
    def name(self) -> str:
        """The run's directory name, else the spec's name."""
        return self.path.name if self.path is not None else str(self.spec.get("name", "sweep"))

    @property
    def axes(self) -> list[str]:
        return swept_axes(self.spec, self.trials)

    @property
    def task(self) -> str:
        return task_name(self.spec, self.trials)


def load_run(run_dir: str | Path, refresh: bool | None = None, frames: Any = None) -> Run:
    """Read a run directory (finished, running or interrupted) without starting Ray: its
    tables (``cae.results.tables.tables``: refreshed first when ``refresh``, or when the run wrote
    something since they were made; or the ``frames`` just exported), its spec and its
    reference errors."""
    from cae.results.tables import read_baselines, tables
    from cae.run.directory import read_spec

    run_dir = Path(run_dir)
    frames = frames if frames is not None else tables(run_dir, refresh)
    spec = read_spec(run_dir)
    return Run(trials=frames.trials, epochs=frames.epochs, spec=spec, path=run_dir,
               baselines=read_baselines(run_dir), notes=frames.notes)


def spec_axes(spec: dict) -> dict[str, tuple[str, Any]]:
    """The spec's axes as ``cae.config.spec.SweepSpec.axes`` reads them: key -> (kind, argument),
    kind one of grid, choice, uniform, loguniform, randint or fixed."""
    from cae.config.spec import SweepSpec

    return SweepSpec.model_validate(spec).axes() if spec else {}


def swept_axes(spec: dict, trials: pd.DataFrame | None = None) -> list[str]:
    """The spec's ``space`` keys that vary (grid, choice or a random range), in spec order."""
    out = [key for key, (kind, _) in spec_axes(spec).items() if kind != "fixed"]
    if trials is not None:
        out = [k for k in out if axis_columns(trials, k)]
    return out


def axis_kind(spec: dict, key: str) -> str:
    """``grid``, ``choice``, ``uniform``, ``loguniform``, ``randint`` or ``fixed``."""
    return spec_axes(spec).get(key, ("fixed", None))[0]


def task_name(spec: dict, trials: pd.DataFrame | None = None) -> str:
    if trials is not None and "task.name" in trials and trials["task.name"].notna().any():
        return str(trials["task.name"].dropna().iloc[0])
    return str(((spec.get("trial") or {}).get("task") or {}).get("name", "reconstruct"))


def axis_columns(trials: pd.DataFrame, key: str) -> list[str]:
    """The trials columns holding an axis: ``key`` itself, or ``key.*`` when a mapping
    (a ``variant`` axis) was flattened into several columns."""
    return [c for c in trials.columns if c == key or c.startswith(key + ".")]


def _label(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str) and value[:1] in "[{":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, dict):
        return ", ".join(f"{k}={_label(v)}" for k, v in value.items()) or "base"
    if isinstance(value, list):
        return "[" + ", ".join(_label(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def axis_labels(trials: pd.DataFrame, key: str) -> pd.Series:
    """One readable label per trial for an axis value (lists and mappings included)."""
    cols = axis_columns(trials, key)
    if cols == [key]:
        return trials[key].map(_label)
    sub = key + "."

    def row_label(row: pd.Series) -> str:
        parts = [f"{c.removeprefix(sub)}={_label(v)}" for c, v in row.items()
                 if c != key and not _missing(v)]
        return ", ".join(parts) or "base"

    return trials[cols].apply(row_label, axis=1) if cols else pd.Series("-", index=trials.index)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == "{}"


def axis_numeric(trials: pd.DataFrame, key: str) -> pd.Series | None:
    """The axis as numbers when it is a plain numeric column, else None."""
    if axis_columns(trials, key) != [key]:
        return None
    col = trials[key]
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        return None
    return col.astype(float)


def sort_key(label: str) -> tuple:
    """Order axis labels numerically where they are numbers, lists by their content."""
    try:
        return (0, float(label), "")
    except ValueError:
        pass
    try:
        parsed = json.loads(label)
        if isinstance(parsed, list) and all(isinstance(v, (int, float)) for v in parsed):
            return (1, len(parsed), parsed)
    except json.JSONDecodeError:
        pass
    return (2, 0, label)


def error_column(trials: pd.DataFrame, prefer: str = "best_val_loss") -> str:
    """``prefer`` when some trial has it, else the best validation loss.

    ``best_val_loss`` is the default ranking: every trial has it, ASHA-stopped trials
    included, whereas only trials that ran to their end were evaluated on the test split.
    """
    if prefer in trials and pd.to_numeric(trials[prefer], errors="coerce").notna().any():
        return prefer
    return "best_val_loss"


def best_trials(trials: pd.DataFrame, n: int, by: str = "best_val_loss") -> pd.DataFrame:
    """The ``n`` trials with the lowest finite ``by``, best first."""
    if trials.empty or by not in trials:
        return trials.iloc[0:0]
    ok = trials[pd.to_numeric(trials[by], errors="coerce").notna()]
    return ok.sort_values(by, kind="stable").head(n)


def family_colors(trials: pd.DataFrame) -> dict[str, str]:
    """A fixed colour per architecture family, the same in every figure of a report."""
    fams = sorted(trials["family"].dropna().astype(str).unique()) if "family" in trials else []
    return {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(fams)}


def short_id(trial_id: Any) -> str:
    """Ray's trial ids are ``<experiment>_<index>``; the index is what tells trials apart."""
    s = str(trial_id)
    return s.rsplit("_", 1)[-1] if "_" in s else s


def config_text(trials: pd.DataFrame, axes: list[str], sep: str = "<br>") -> pd.Series:
    """Per trial: its swept axis values and model facts, for hover labels."""
    parts = [axis_labels(trials, k).map(lambda v, k=k: f"{k} = {v}") for k in axes]
    facts = []
    if "params" in trials:
        facts.append(trials["params"].map(lambda p: f"params = {_int(p)}"))
    if "family" in trials:
        facts.append(trials["family"].map(lambda f: f"family = {f}"))
    if "status" in trials:
        facts.append(trials["status"].astype(str) + " (" +
                     trials.get("stop_reason", pd.Series("", index=trials.index)).astype(str)
                     + ")")
    cols = parts + facts
    if not cols:
        return pd.Series("", index=trials.index)
    text = cols[0].astype(str)
    for c in cols[1:]:
        text = text + sep + c.astype(str)
    return text


def _int(x: Any) -> str:
    try:
        return f"{int(x):,}"
    except (TypeError, ValueError):
        return "-"

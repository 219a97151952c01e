"""The base of every config model: unknown keys are errors (they name the field), and so
are infinite and NaN numbers (no setting means "without end" by ``.inf``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """The base of every config: unknown keys and non-finite numbers are errors, fields
    stay assignable."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False,
                              allow_inf_nan=False)

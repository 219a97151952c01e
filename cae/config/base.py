"""The base of every config model: unknown keys are errors (they name the field)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """The base of every config: unknown keys are errors, fields stay assignable."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False)

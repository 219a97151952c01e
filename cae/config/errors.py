"""Errors in what the user asked for, and how they are shown.

:class:`UserError` is the one exception type for them: the CLI prints its message as one
line and exits with status 2. A pydantic validation error becomes one such line naming each
field (:func:`format_validation_error`, :func:`validate`); ``--debug`` (:func:`debug`) asks
for tracebacks instead. Nothing of cae is imported here, so that every module that reads
user input (the configs, the datasets, the command line) can raise it without importing the
others.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ValidationError


class UserError(Exception):
    """An error in what the user asked for (a spec, a path, a dataset, a run directory):
    the CLI prints its message as one line and exits with status 2."""


def format_validation_error(exc: ValidationError, source: str = "") -> str:
    """One readable message from a pydantic ValidationError, naming each field."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    head = f"invalid config{f' ({source})' if source else ''}: "
    return head + "; ".join(lines)


def validate(model: type[BaseModel], data: Any, source: str = "") -> Any:
    """``model.model_validate(data)``, a validation error becoming a :class:`UserError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None


def debug() -> bool:
    """Whether ``--debug`` or ``CAE_DEBUG=1`` asks for tracebacks instead of one-line
    messages."""
    return os.environ.get("CAE_DEBUG", "") not in ("", "0")

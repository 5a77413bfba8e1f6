"""Shared pydantic building blocks for the config schema.

Sections are strict (no silent str->int coercion, unknown keys forbidden) so a
typo or a quoted number is reported instead of guessed at.  `WholeNumber`
exists because DeepSpeed sizes are naturally written `5e8`, which YAML and
JSON read as a float.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _whole_float_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_float_to_int), Field(ge=0)]
"""A non-negative integer that may be written in float notation (`5e8`)."""


class Section(BaseModel):
    """Base class of every config section: strict types, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


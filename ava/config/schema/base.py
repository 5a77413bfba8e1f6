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


# Keys that are accepted but no longer mean anything in the libraries Ava
# uses.  A user setting them gets a warning saying what to do instead; they
# are never silently honoured or silently ignored.
DEPRECATED_KEYS: dict[str, str] = {
    "deepspeed.fp8_interval": (
        "fp8_interval (Transformer Engine's DelayedScaling `interval`) has no effect in current "
        "libraries: Transformer Engine deprecated it and recomputes FP8 scaling factors every step, "
        "and torchao float8 training uses per-step dynamic scaling. Remove the key; there is "
        "nothing to replace it with"
    ),
}

"""Shared pydantic building blocks for the config schema.

Sections are strict (no silent str->int coercion, unknown keys forbidden) so a
typo or a quoted number is reported instead of guessed at.  `WholeNumber`
exists because DeepSpeed sizes are naturally written `5e8`, which YAML and
JSON read as a float.

Every number has an upper bound, from the constants below: a value past it
(a row of zeros too many, a size meant for another unit) is a configuration
error naming the key and the accepted range, not a crash deep inside torch
or numpy after the config was declared fine.  Each constant says why it is
where it is; tests/config/test_numeric_bounds.py fails for a numeric key
without a bound.  Floats must also be finite (`allow_inf_nan=False`: YAML's
`.nan` and `.inf` are refused), and `Section` refuses any integer outside
int64 even for a key that forgot its bound.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# ---- upper bounds of numeric keys (inclusive, `le=`)
INT64_MAX = 2**63 - 1
"""torch's and numpy's index and size type: no integer past it can reach a tensor (the catch-all)."""
COUNT_MAX = 2**53
"""Steps, intervals and other counts: float64 holds every integer up to 2^53 exactly, so an LR schedule
(step / max_steps), a logged step or a ratio computed from a count stays exact; no run takes 2^53 steps."""
ITEMS_MAX = 2**30
"""Things held at once in a Python list or buffer (examples, prompts, documents of a shuffle buffer, norms of a
median window): 2^30 objects already take 100+ GiB of host memory."""
TOKENS_MAX = 2**24
"""Tokens in one sequence (lengths, positions, generated tokens): 16.7M, above the longest context any model
offers (about 10M)."""
VOCAB_MAX = 2**24
"""Vocabulary sizes and token ids: 16.7M, 64 times the largest vocabularies in use (256k); with widths up to
WIDTH_MAX an embedding table stays below 2^44 elements."""
WIDTH_MAX = 2**20
"""Widths (hidden, FFN, context, encoder), head counts and adapter ranks: 1,048,576, 14 times the widest FFN
published (PaLM's 73,728); the product of two widths, a weight matrix, stays below 2^40 elements."""
LAYERS_MAX = 2**14
"""Layers (and layer intervals): 16,384, 16 times the deepest transformer trained (DeepNet's 1,000 layers)."""
EXPERTS_MAX = 2**16
"""Experts and expert-parallel ranks: 65,536, a hundred times the largest MoE layers in use (256-384 experts)."""
BATCH_MAX = 2**16
"""Sequences in a micro batch, micro batches per step, prompts or samples per step: 65,536, so that the tokens of
one rank's step (micro batch x accumulation x TOKENS_MAX <= 2^56) stay well inside int64."""
WORKERS_MAX = 1024
"""Loader threads and batches prefetched per thread: more than any machine's cores."""
ELEMENTS_MAX = 2**40
"""DeepSpeed bucket and parameter-count settings, in elements: 2^40 is 4 TiB of fp32, beyond any device."""
LR_MAX = 1.0
"""Learning rates: Adam moves every weight by about the LR each step, so an LR of 1 already erases weights
initialised at 0.02; typical values are 1e-5 to 1e-2."""
COEF_MAX = 1000.0
"""Weights of auxiliary loss terms, relative to the language-model loss's 1: at 1,000 the LM loss is noise."""
CLIP_MAX = 1e6
"""Gradient-norm clips and thresholds: a clip above 1e6 clips nothing a finite run produces (0 turns clipping off)."""
SCALE_MAX = 1e6
"""Reward, value and KL magnitudes (scores, clips, targets in nats per sequence) and other unbounded scales."""
WEIGHT_MAX = 1e15
"""Relative mixing weights: generous enough to give a source's token count (up to a petatoken) as its weight."""
SEED_MAX = 2**32 - 1
"""Seeds: the conventional 32-bit range, the one numpy's legacy RandomState and every library accept."""


def _whole_float_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_float_to_int), Field(ge=0)]
"""A non-negative integer that may be written in float notation (`5e8`)."""


class Section(BaseModel):
    """Base class of every config section: strict types, finite floats, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        """The catch-all bound: no integer beyond int64 passes, whatever the key's own bounds say."""
        if type(value) is int and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise PydanticCustomError("int64_range", "must fit a 64-bit integer (at most 2^63 - 1)")
        return value

"""Perplexity from a mean next-token loss, as every report of a run shows it."""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports a large number rather than inf."""
    return math.exp(min(loss, 50.0))

"""The Mixture-of-Experts feed-forward layer: router, dispatch, experts, losses, metrics."""

from ava.model.moe.layer import MoELayer
from ava.model.moe.metrics import MoEStats, summarise_moe_stats

__all__ = ["MoELayer", "MoEStats", "summarise_moe_stats"]

"""Several sources into one stream of documents: weighted sampling or plain concatenation.

Weighted sampling draws each next document from source i with probability

    p_i = w_i^(1/T) / sum_j w_j^(1/T)

where w_i is the source's explicit weight or else its size, and T the
temperature: T = 1 keeps the weights (by size: every document equally
likely), T -> infinity tends to uniform over sources, which upsamples small
ones (the recipe of mT5/XLM-R).  The draw is `datasets.interleave_datasets`,
seeded, so the mix is the same on every rank and in every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from ava.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

D = TypeVar("D", "Dataset", "IterableDataset")

# "all_exhausted": the mix ends once every source has been read to its end at least once; a source that
# runs out earlier starts again. With "first_exhausted" a temperature above 1 would end the epoch as soon as
# the upsampled small source ran out, leaving most of the large ones unread.
STOPPING_STRATEGY = "all_exhausted"


def mixing_probabilities(weights: Sequence[float], temperature: float) -> list[float]:
    """p_i proportional to weights_i^(1/temperature), computed in log space (sizes can be 1e12)."""
    if temperature <= 0:
        raise UserError(f"data.mixing_temperature = {temperature} must be positive", "use a value > 0, e.g. 1.0")
    if not weights or any(not w > 0 for w in weights):
        raise UserError(f"mixing weights {list(weights)} must all be positive",
                        "give each source a positive weight, or remove empty sources")
    logs = [math.log(w) / temperature for w in weights]
    top = max(logs)
    scaled = [math.exp(v - top) for v in logs]
    total = sum(scaled)
    return [s / total for s in scaled]


def chosen_weights(explicit: Sequence[float | None], sizes: Sequence[float], keys: Sequence[str]) -> list[float]:
    """The explicit weights when every source has one, the sizes when none has; a mixture is refused.

    Weights and sizes are in different units, so one source's weight and
    another's size cannot be compared.
    """
    given = [key for key, w in zip(keys, explicit, strict=True) if w is not None]
    if not given:
        return [float(s) for s in sizes]
    if len(given) < len(keys):
        missing = [key for key, w in zip(keys, explicit, strict=True) if w is None]
        raise UserError(f"{', '.join(k + '.weight' for k in given)} set but {', '.join(missing)} has none",
                        "give every source a weight, or none (then sources are weighed by their size)")
    return [float(w) for w in explicit if w is not None]


def mix(datasets: Sequence[D], probabilities: Sequence[float] | None, seed: int) -> D:
    """Interleave by `probabilities` (seeded), or concatenate in order when they are None."""
    from datasets import concatenate_datasets, interleave_datasets

    if len(datasets) == 1:
        return datasets[0]
    if probabilities is None:
        return concatenate_datasets(list(datasets))
    return interleave_datasets(list(datasets), probabilities=list(probabilities), seed=seed,
                               stopping_strategy=STOPPING_STRATEGY)

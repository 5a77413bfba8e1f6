"""The one list of keys that are accepted for compatibility and have no effect.

Every other key of the schema is read by the code (tests/config/test_every_key_is_read.py
checks both ways: a key nothing reads must be listed here, and a listed key
must be read by nothing). A listed key is accepted so that configs written for
the configuration guide, or for another trainer, still load; set to anything
but its default, in any layer (a config file, a hardware file, the command
line), it draws a warning saying why it does nothing and what to do instead.
It is never silently honoured and never silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

# dotted key -> why it has no effect (the warning: "<key>: <value> has no effect: <why>").
COMPATIBILITY_ONLY: dict[str, str] = {
    "deepspeed.fp8_interval": (
        "it was Transformer Engine's DelayedScaling `interval`, which current libraries no longer use: "
        "Transformer Engine deprecated it and recomputes FP8 scaling factors every step, and torchao float8 "
        "training uses per-step dynamic scaling. Remove the key; there is nothing to replace it with"
    ),
    "data.padding_side": (
        "Ava pads only on the right, where padding is exact for a causal model (no token attends to a later one "
        "and padding carries no label): SFT rows give their padding a document of its own, preference and "
        "rollout sequences are padded after their last token, and rollout prompts are sampled in groups of one "
        "length, so no prompt is padded on the left. Left padding could only change speed, not what is "
        "trained. Remove the key"
    ),
    "data.dataloader_persistent_workers": (
        "batches do not come from a torch DataLoader: exact resume needs one producer, a single thread that "
        "lives for the whole run (see ava.data.setup), so there are no worker processes to keep alive. "
        "Remove the key; data.dataloader_num_workers and data.dataloader_prefetch_factor set the prefetching"
    ),
}


def compatibility_warnings(sections: Mapping[str, BaseModel | None]) -> Iterator[tuple[str, Any, str]]:
    """(dotted key, value, why) for each listed key whose validated value is not its default.

    `sections` are the validated sections by name (None or absent: invalid or not given, nothing to say).
    """
    for key, why in COMPATIBILITY_ONLY.items():
        section, *path = key.split(".")
        owner: Any = sections.get(section)
        for name in path[:-1]:
            owner = getattr(owner, name, None)
        if not isinstance(owner, BaseModel):
            continue
        value = getattr(owner, path[-1])
        if value != type(owner).model_fields[path[-1]].get_default(call_default_factory=True):
            yield key, value, why

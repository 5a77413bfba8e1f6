"""The weights of a `training.init_from` checkpoint, in Ava's names, whichever format it is in.

The architecture was read (without torch) during config loading, by
`ava.config.pretrained.locate`; the weights are loaded here. This needs both
the model (`ava.model.store`, for an Ava directory) and the Hugging Face
conversion (`import_hf`, for a config.json directory), so it lives in the
package that already sits above the model: `ava.model` stays free of any
Hugging Face import, and `ava.config` of any torch one.
"""

from __future__ import annotations

from typing import Any

import torch

from ava.config.pretrained import Pretrained


def load_weights(source: Pretrained) -> dict[str, torch.Tensor]:
    """The checkpoint's full state dict in Ava's names, fp32."""
    if source.kind == "hf":
        from ava.hf import import_hf

        model: Any = import_hf(source.path)
    else:
        from ava.model.store import load_model_dir

        model = load_model_dir(source.path)
    return {k: v.float() for k, v in model.state_dict().items()}

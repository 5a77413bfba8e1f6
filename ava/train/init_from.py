"""Apply `training.init_from` to a resolved configuration: the checkpoint decides the model's shape.

Done right after the config stack resolves, for a dry run and a real run
alike, so the printed plan, the run's `config.yaml` (from which checkpoints
are later exported) and the model built all agree with the checkpoint. Each
adopted key's origin says it came from the checkpoint.
"""

from __future__ import annotations

import dataclasses

from ava.config.loader import ResolvedConfig
from ava.config.provenance import Layer, Origin
from ava.model.errors import ModelInputError
from ava.model.pretrained import SHAPE_KEYS, Pretrained, adopt_architecture, locate


def apply_init_from(resolved: ResolvedConfig) -> tuple[ResolvedConfig, Pretrained | None]:
    """The resolved config with the checkpoint's architecture, and where the weights are; unchanged without init_from."""
    cfg = resolved.config
    if cfg.training.init_from is None:
        return resolved, None
    source = locate(cfg.training.init_from)
    explicit = {path[1] for path, origin in resolved.origins.items()
                if len(path) == 2 and path[0] == "model" and origin.layer is not Layer.DEFAULT}
    where = {name: resolved.origin(("model", name)).where() for name in explicit}
    model = adopt_architecture(cfg.model, source, explicit, where)
    if cfg.data.max_length > model.max_position_embeddings:
        raise ModelInputError(
            f"data.max_length = {cfg.data.max_length} ({resolved.origin('data.max_length').where()}) exceeds the "
            f"{model.max_position_embeddings} positions of {source.describe()}",
            f"set data.max_length to at most {model.max_position_embeddings}")
    data = resolved.to_dict()
    data["model"] = model.model_dump(mode="json")
    origins = dict(resolved.origins)
    adopted = Origin(Layer.DERIVED, detail=f"from training.init_from {source.path}")
    for name in SHAPE_KEYS:
        origins[("model", name)] = adopted
    config = cfg.model_copy(update={"model": model})
    return dataclasses.replace(resolved, config=config, origins=origins, _data=data), source

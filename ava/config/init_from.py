"""`training.init_from` inside config loading: the checkpoint's architecture replaces the model: section.

It happens after the sections validate and *before* the cross-key checks, so
every check (LoRA targets, expert parallelism, sequence length, ...) judges
the model that will actually be built, a dry run prints it, and the run's
`config.yaml` (from which checkpoints are later exported) records it. Each
adopted key's origin names the checkpoint. A directory that does not exist
(yet) is only a warning here, so a config can be validated before its
weights are copied; `train.py` refuses to start without it.

Only the architecture is read (`ava.config.pretrained`: `ava_model.yaml` or a
Hugging Face config.json), so loading a config never imports torch or the
model package; the weights are loaded later, by `ava.hf.pretrained`.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from ava.config.errors import Notice, Problem
from ava.config.pretrained import SHAPE_KEYS, adopt_architecture, locate
from ava.config.provenance import DEFAULT_ORIGIN, Layer, Origin
from ava.config.schema import ModelConfig, TrainingConfig
from ava.config.yaml_loader import KeyPath
from ava.errors import UserError


def adopt_pretrained(sections: MutableMapping[str, Any],
                     origins: dict[KeyPath, Origin]) -> tuple[list[Problem], list[Notice]]:
    """Replace `sections["model"]` by the checkpoint's architecture (in place); returns problems and notices."""
    training, model = sections.get("training"), sections.get("model")
    if not isinstance(training, TrainingConfig) or not isinstance(model, ModelConfig) or not training.init_from:
        return [], []
    where = origins.get(("training", "init_from"), DEFAULT_ORIGIN).where()
    if not Path(training.init_from).exists():
        return [], [Notice("warning", where, "training.init_from",
                           f"{training.init_from} does not exist (yet): the model: section is checked as written; "
                           "train.py needs the directory")]
    explicit = {path[1] for path, origin in origins.items()
                if len(path) == 2 and path[0] == "model" and origin.layer is not Layer.DEFAULT}
    try:
        source = locate(training.init_from)
        sections["model"] = adopt_architecture(
            model, source, explicit, {n: origins[("model", n)].where() for n in explicit})
    except UserError as exc:
        return [Problem(where, "training.init_from", exc.message.removeprefix("training.init_from: "), exc.fix,
                        training.init_from)], []
    adopted = Origin(Layer.DERIVED, detail=f"from training.init_from {source.path}")
    for name in SHAPE_KEYS:
        origins[("model", name)] = adopted
    return [], []

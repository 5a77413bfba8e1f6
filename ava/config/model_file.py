"""`ava_model.yaml`: the model: section an Ava model directory was saved with.

Reading and writing it is configuration work (YAML <-> `ModelConfig`) that
needs no torch, so it lives here rather than beside the weights in
`ava.model.store`: config loading reads a `training.init_from` directory's
architecture (`ava.config.pretrained`) without importing the model package,
and `ava.model.store` imports this module, never the reverse.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from ava.config.schema.model import ModelConfig
from ava.errors import UserError

CONFIG_FILE = "ava_model.yaml"


def write_model_config(config: ModelConfig, directory: Path) -> None:
    """`ava_model.yaml`: the model: section that rebuilds the model the weights belong to."""
    (directory / CONFIG_FILE).write_text(
        "# Ava model config, written by Ava; the model: section of a training config.\n"
        + yaml.safe_dump({"model": config.model_dump()}, sort_keys=False))


def load_model_config(directory: str | Path) -> ModelConfig:
    """The model config of the Ava model directory `directory` (its weights are not read)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: {directory} is not an Ava model directory",
                        "point at a directory written by `ava model import-hf` or a training run")
    try:
        data = yaml.safe_load(path.read_text())
        return ModelConfig.model_validate(data["model"])
    except (yaml.YAMLError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(f"{path} is not a valid Ava model config: {exc}",
                        "re-export the model, or repair the model: section of that file") from exc

"""Where a run's initial weights come from, once the config stack (with the adopted architecture) is resolved.

`load_config` already gave the model: section the checkpoint's architecture
(`ava.config.init_from`). Here the run finds the weights, and a resumed run
whose `init_from` directory has since moved or gone is rebuilt from the
architecture its own `config.yaml` recorded: its checkpoint holds the
weights, so the pretrained directory is not needed any more.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ava.config.loader import ResolvedConfig
from ava.config.pretrained import Pretrained, locate


def pretrained_for_run(resolved: ResolvedConfig, resume_dir: Path | None) -> tuple[ResolvedConfig, Pretrained | None]:
    """(the config to train, the checkpoint to start from or None); a missing directory is an error unless resuming."""
    init = resolved.config.training.init_from
    if init is None:
        return resolved, None
    if Path(init).exists() or resume_dir is None:
        return resolved, locate(init)  # a missing directory raises the user error here
    from ava.train.checkpoint.export import run_model_config

    model = run_model_config(resume_dir)
    data = resolved.to_dict()
    data["model"] = model.model_dump(mode="json")
    config = resolved.config.model_copy(update={"model": model})
    return dataclasses.replace(resolved, config=config, _data=data), None

"""Training: a run (`run`), the `Trainer` and its callbacks, the engine, checkpoints, and what the run reports.

    from ava.train import run
    outcome = run(resolved_config, output_dir="outputs/my-run", callbacks=[...])

The data flows one way through the folders: `engine/` builds and steps the
DeepSpeed engine, `trainer/` runs the fit loop and calls the callbacks,
`callbacks/` hold every optional behaviour, `checkpoint/`, `runtime/`,
`report/` and `inputs/` are what those use; `pretraining.py` and `lm.py`
assemble a language-model run from them, `runner.py` owns a run's outputs.
Names are imported on first use: `import ava.train.runtime.rendezvous` does
not pay for torch and DeepSpeed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Callback", "RunOutcome", "Trainer", "TrainResult", "run"]

_EXPORTS = {"run": "ava.train.runner", "RunOutcome": "ava.train.runner", "Callback": "ava.train.trainer.callback",
            "Trainer": "ava.train.trainer.trainer", "TrainResult": "ava.train.trainer.trainer"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ava.train' has no attribute {name!r}")

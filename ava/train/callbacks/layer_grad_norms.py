"""Per-layer gradient norms on logging steps (`training.gradient_health.layer_grad_norms`).

Measured after the step's last backward and before its optimizer step, when
the gradients are complete and not yet cleared; DeepSpeed assembles each
parameter's reduced gradient under any ZeRO stage (a collective: every rank
measures). The norms join that step's record as `grad_norm/<layer>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ava.train.engine.update_gate import layer_grad_norms
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import Trainer


class LayerGradNorms(Callback):
    """Adds `grad_norm/embed_tokens`, `grad_norm/layers.N`, ... to every step record."""

    name = "layer_grad_norms"

    def __init__(self) -> None:
        self._norms: dict[str, float] = {}
        self._step: int | None = None

    def before_update(self, trainer: Trainer, step: int) -> None:
        if trainer.logs(step):
            model = next(iter(trainer.module.engines.values())).module
            self._norms, self._step = layer_grad_norms(model), step

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self._step is not None and record.get("step") == self._step and "loss" in record:
            record.update(self._norms)
            self._norms, self._step = {}, None

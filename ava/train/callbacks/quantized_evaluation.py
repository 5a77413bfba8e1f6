"""At the end of a run with `quantization:`, the held-out loss of the quantized model beside the unquantized one.

Runs last, after the final checkpoint was written and verified and the
sample was generated: the conversion replaces the trained model's weights in
place (`ava.train.engine.quantization.convert`), so nothing may use the
in-memory model for training after it. The checkpoint and the exported
`model/` keep the trained high-precision weights. The comparison is logged
as a `quantized_evaluation` event (metrics.jsonl; summary.json's
`quantization` is read from it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ava.train.engine.quantization import QuantizationReport, convert, set_fake_quantization
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import Trainer


class QuantizedEvaluation(Callback):
    """Evaluates `model` unquantized, converts it as `report` plans, and evaluates it again; logs both losses.

    The trainer's module must offer `evaluate()`. Every rank runs it (an
    evaluation averages over the ranks).
    """

    name = "quantized_evaluation"

    def __init__(self, model: nn.Module, report: QuantizationReport, has_held_out: bool,
                 exports_best: bool = False) -> None:
        self.model, self.report, self.has_held_out = model, report, has_held_out
        self.exports_best = exports_best  # save_strategy best: model/ is the best checkpoint, not these weights

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.result.status in ("preempted", "failed"):
            return  # a preempted run continues later; a failed one has no model worth converting
        record = {"step": trainer.step, "event": "quantized_evaluation"}
        if not self.has_held_out:
            trainer.log({**record, "reason": "skipped: no held-out data to evaluate the quantized model on"})
            return
        evaluate = trainer.module.evaluate  # type: ignore[attr-defined]
        r = self.report
        with trainer.not_training():
            set_fake_quantization(self.model, False)
            r.unquantized_eval_loss = evaluate()
            convert(self.model, r)
            r.quantized_eval_loss = evaluate()
        line = r.result_line()
        if self.exports_best:
            line += (f"; these are the final weights (step {trainer.step}), while model/ is the best checkpoint "
                     "(save_strategy: best)")
        trainer.log({**record, "reason": line, "quantization": {**r.as_dict(), "step": trainer.step},
                     "quantization/unquantized_eval_loss": r.unquantized_eval_loss,
                     "quantization/quantized_eval_loss": r.quantized_eval_loss})

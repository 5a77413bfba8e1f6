"""The fit loop and the callback protocol it calls: `Trainer`, `TrainModule`, `Callback`.

Nothing here knows what a step trains (a language model, an RLHF stage) or
which optional behaviours a run has: those are the module the trainer drives
and the callbacks it is given.
"""

from ava.train.trainer.callback import Callback, CallbackList
from ava.train.trainer.trainer import StepOutcome, StepOutput, Trainer, TrainModule, TrainResult

__all__ = ["Callback", "CallbackList", "StepOutcome", "StepOutput", "TrainModule", "Trainer", "TrainResult"]

"""Held-out evaluation, the best-so-far record and early stopping.

`EvalMonitor` is plain data with a `state_dict`, so it travels in every
checkpoint: a resumed run remembers its best loss and how many evaluations
have passed without improvement, and stops early at exactly the step the
uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ava.model.transformer import Context


def evaluate(engine: torch.nn.Module, batches: Iterable[torch.Tensor],
             context: Callable[[torch.Tensor, torch.device], Context | None] | None = None) -> float:
    """Mean next-token loss (the language-model part, no router loss) over `batches`, averaged over ranks.

    `context(batch, device)` gives what a batch reads besides its tokens (`ava.train.batch_context`).

    Every rank must call it with the same number of batches: under ZeRO-3 each
    forward gathers parameters collectively.
    """
    was_training = engine.training
    engine.eval()
    device = next(engine.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for host in batches:
            read = context(host, device) if context is not None else None
            batch = host.to(device)
            total += engine(batch, labels=batch, context=read).lm_loss.double().cpu()
            count += 1
    engine.train(was_training)
    if count == 0:
        return math.nan
    mean = total / count
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    return float(mean)


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports a large number rather than inf."""
    return math.exp(min(loss, 50.0))


@dataclass
class EvalMonitor:
    """Tracks the best evaluation loss and decides when to stop early.

    An evaluation improves on the best when it is lower by more than
    `threshold` (absolute, in nats). After `patience` evaluations in a row
    without improvement the run stops; `patience=None` never stops.
    """

    patience: int | None
    threshold: float
    best_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Record the evaluation at `step`; True when it is the new best."""
        improved = math.isfinite(loss) and loss < self.best_loss - self.threshold
        if improved or (self.best_step is None and math.isfinite(loss)):
            self.best_loss, self.best_step, self.evals_without_improvement = loss, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= max(self.patience, 1)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("patience", "threshold")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_step = state["best_step"]
        self.evals_without_improvement = int(state["evals_without_improvement"])

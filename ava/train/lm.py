"""Pre-training steps: the `TrainModule` of a language-model run (next-token loss over packed batches).

One optimizer step takes `accumulation` micro batches on this rank: each
forward runs in the precision policy's context, its loss is backpropagated
(DeepSpeed accumulates and steps at the boundary), and the step goes through
the shared `OptimizerStep` (LR, clip, health gate, router biases). Loss
values stay on the device; only logging steps read them back, averaged over
the data-parallel ranks, so a logged loss is the whole global batch's on any
number of ranks. The module also evaluates held-out batches, samples from
the model, and checks that a checkpoint reloads to the same loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ava.data.batches import Batches, SequenceBatches
from ava.model.moe import summarise_moe_stats
from ava.model.penalties import LossPenalties, segments_from_eos
from ava.model.transformer import Context
from ava.train.engine.build import Engine
from ava.train.engine.optimizer_step import OptimizerStep
from ava.train.engine.router_balance import add_loads
from ava.train.engine.update_gate import clip_in_use
from ava.train.inputs.batch_context import BatchContext
from ava.train.runtime.faults import FaultPlan
from ava.train.trainer.trainer import StepOutput, mean_over_ranks

SAMPLE_PROMPT_TOKENS = 32


def _forever(batches: Batches) -> Iterator[torch.Tensor]:
    while True:
        yield from batches


def held_out(batches: SequenceBatches, limit: int | None = None) -> Iterator[torch.Tensor]:
    """The held-out batches from the first, every time (the batches object remembers its position)."""
    batches.load_state_dict({"epoch": 0, "batch_index": 0})
    return islice(iter(batches), limit)


def evaluate(engine: torch.nn.Module, batches: Any,
             context: Callable[[torch.Tensor, torch.device], Context | None] | None = None) -> float:
    """Mean next-token loss (the language-model part, no router loss) over `batches`, averaged over ranks.

    `context(batch, device)` gives what a batch reads besides its tokens (`ava.train.inputs.batch_context`).
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


class LanguageModelSteps:
    """The steps of a pre-training (or LM fine-tuning) run, for the `Trainer`."""

    def __init__(self, engine: Engine, optimizer: OptimizerStep, train_batches: Batches,
                 eval_batches: SequenceBatches | None, *, accumulation: int, tokens_per_step: int,
                 flops_per_token: float, reports_router_loss: bool, measure_update: bool = False,
                 batch_context: BatchContext | None = None, faults: FaultPlan | None = None, rank: int = 0,
                 penalties: LossPenalties | None = None) -> None:
        self.model, self.optimizer = engine, optimizer
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.accumulation, self.tokens_per_step, self.flops_per_token = accumulation, tokens_per_step, flops_per_token
        self.reports_router_loss, self.measure_update = reports_router_loss, measure_update
        self.batch_context, self.faults, self.rank = batch_context, faults, rank
        self.penalties = penalties
        self._stream = _forever(train_batches)

    @property
    def engines(self) -> dict[str, Any]:
        return {"model": self.model.engine}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def state_dict(self) -> dict[str, Any]:
        return self.train_batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_batches.load_state_dict(state)

    def train_step(self, step: int, logs: bool, before_update: Callable[[], None]) -> StepOutput:
        engine, opt, device = self.model.engine, self.optimizer, self.device
        opt.updates = step - 1  # the schedule follows the run's step, across a resume or a rollback
        opt.begin()
        step_loss = torch.zeros((), device=device)
        lm_loss = torch.zeros((), device=device)
        router_loss = torch.zeros((), device=device)
        loads: list[torch.Tensor] = []  # per MoE layer, summed over the step's micro batches
        penalty_losses: dict[str, Any] = {}  # each active penalty's weighted term, averaged over the micro batches
        out = None
        for micro in range(self.accumulation):
            host = next(self._stream)
            read = self.batch_context(host, device) if self.batch_context is not None else None
            batch = host.to(device)
            with self.model.autocast():
                out = engine(batch, labels=batch, context=read)
            loss = out.loss
            if self.penalties is not None:  # None when every weight is 0: the loss is then the model's, unchanged
                terms = self.penalties(out.logits, batch, batch, *segments_from_eos(batch, self.penalties.eos_id))
                for name, term in terms.items():
                    loss = loss + term
                    penalty_losses[name] = penalty_losses.get(name, 0.0) + term.detach().float() / self.accumulation
            loss = loss if self.faults is None or micro else self.faults.apply(step, self.rank, loss)
            engine.backward(loss)
            step_loss += loss.detach().float() / self.accumulation
            lm_loss += out.lm_loss.detach().float() / self.accumulation
            if out.router_loss is not None:
                router_loss += out.router_loss.detach().float() / self.accumulation
            if opt.balances_biases:
                loads = add_loads(loads, out.moe_stats)
            if micro == self.accumulation - 1:
                before_update()
                opt.judge(step_loss, measure_update=logs and self.measure_update)
            engine.step()
        verdict = opt.finish(loads)
        health = opt.health
        result = StepOutput(step_loss, lm_loss, verdict, events=health.drain_events() if health is not None else [])
        if logs:
            assert out is not None
            result.record = self._record(step_loss, lm_loss, router_loss, [*out.moe_stats, *out.attention_stats],
                                         verdict, penalty_losses)
        return result

    def _record(self, step_loss: torch.Tensor, lm_loss: torch.Tensor, router_loss: torch.Tensor, stats: list,
                verdict: Any, penalty_losses: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A logging step's record: the global batch's losses (one host read), the LR, norms, routing stats."""
        engine, opt = self.model.engine, self.optimizer
        names = list(penalty_losses)
        loss, lm, router, *penalties = mean_over_ranks(
            torch.stack([step_loss, lm_loss, router_loss, *(penalty_losses[n] for n in names)])).tolist()
        record: dict[str, Any] = {"loss": loss, "lm_loss": lm, "lr": engine.get_lr()[0]}
        if self.reports_router_loss:
            record["router_loss"] = router
        record.update(zip(names, penalties, strict=True))
        norm = opt.gate.grad_norm if opt.gate is not None else engine.get_global_grad_norm()
        if norm is not None:
            record["grad_norm"] = float(norm) if math.isfinite(norm) else str(norm)
        if opt.health is not None and opt.gate is not None:
            record["clip"] = clip_in_use(engine)
            record["update_applied"] = bool(verdict and verdict.apply)
            record.update(opt.health.signals())
            if opt.gate.update_ratio is not None:
                record["update_to_weight"] = opt.gate.update_ratio
            if opt.gate.weight_norm is not None:
                record["weight_norm"] = opt.gate.weight_norm
        record.update(summarise_moe_stats(stats))
        return record

    # -- what the callbacks ask of the model --------------------------------------------------------

    def evaluate(self, limit: int | None = None) -> float:
        """The held-out loss over the evaluation batches (from the first; `limit` of them)."""
        assert self.eval_batches is not None
        return evaluate(self.model.engine, held_out(self.eval_batches, limit), self.batch_context)

    def sample(self, max_new_tokens: int) -> tuple[list[int], list[int]] | None:
        """A greedy continuation of the first held-out sequence's opening tokens (the same on every rank)."""
        if self.eval_batches is None or max_new_tokens <= 0:
            return None
        model: Any = self.model.module
        limit = int(model.config.max_position_embeddings)
        first = next(held_out(self.eval_batches, 1), None)
        if first is None:
            return None
        prompt_len = min(SAMPLE_PROMPT_TOKENS, first.shape[1], max(1, limit // 2))
        new_tokens = min(max_new_tokens, limit - prompt_len)
        prompt = first[:1, :prompt_len].to(self.device)
        generated = model.generate(prompt, new_tokens, temperature=0.0)
        return prompt[0].tolist(), generated[0, prompt_len:].tolist()

    def reload_matches(self, point: Path, load: Callable[[Path], Any]) -> bool | None:
        """Reload checkpoint `point` (through `load`) and check a held-out loss is unchanged, bit for bit."""
        if self.eval_batches is None:
            return None
        batch = list(held_out(self.eval_batches, 1))
        before = evaluate(self.model.engine, batch, self.batch_context)
        load(point)
        after = evaluate(self.model.engine, batch, self.batch_context)
        return before == after or (math.isnan(before) and math.isnan(after))

"""A pre-training (or LM fine-tuning) run assembled: model -> engine -> steps -> callbacks -> Trainer.

`train()` builds the model from the model: section (seeded, so every rank
starts from the same weights), loads `training.init_from`'s weights, wraps
LoRA adapters, opens the retrieval store, builds the engine and the shared
optimizer step, composes the callbacks in the order they must run
(the LR decay horizon, per-layer gradient norms, gradient-health rollback,
evaluation; the caller's; checkpointing, preemption, and with `quantization:` the
quantized model's evaluation), and fits. Writing files
and printing are the caller's: pass the sinks as callbacks, last
(`ava.train.run` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch

from ava.config.schema import AvaConfig, TrainingConfig
from ava.data.batches import Batches, SequenceBatches
from ava.model import AvaForCausalLM
from ava.model.lora import prepare_trainable
from ava.model.penalties import LossPenalties
from ava.model.store import load_state_exactly
from ava.model.summary import summarise_model
from ava.train.callbacks.checkpointing import Checkpointing
from ava.train.callbacks.evaluation import Evaluation
from ava.train.callbacks.gradient_health import GradientHealth
from ava.train.callbacks.layer_grad_norms import LayerGradNorms
from ava.train.callbacks.lr_horizon import LRHorizon
from ava.train.callbacks.preemption import Preemption
from ava.train.callbacks.quantized_evaluation import QuantizedEvaluation
from ava.train.checkpoint.checkpointer import Checkpointer
from ava.train.engine.build import build_engine
from ava.train.engine.gradient_health import HealthMonitor
from ava.train.engine.lr_schedule import LRSchedule
from ava.train.engine.optimizer_step import OptimizerStep
from ava.train.engine.quantization import prepare_quantization
from ava.train.inputs.retrieval import RetrievalPlan
from ava.train.lm import LanguageModelSteps
from ava.train.runtime.distributed import ProcessInfo
from ava.train.runtime.faults import FaultPlan
from ava.train.runtime.preemption import PreemptionFlag
from ava.train.trainer.callback import Callback
from ava.train.trainer.trainer import Trainer, TrainResult


class Reporter(Protocol):
    """Where set-up notes and warnings go (the run's console)."""

    def note(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...


class _Silent:
    def note(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass


def total_steps(training: TrainingConfig, batches_per_epoch: int, accumulation: int) -> int:
    """max_steps when set, else num_epochs passes over this rank's batches."""
    if training.max_steps is not None:
        return training.max_steps
    return max(1, training.num_epochs * batches_per_epoch // accumulation)


def lr_schedule(training: TrainingConfig, steps: int) -> LRSchedule:
    """The run's LR schedule over `steps` optimizer steps."""
    return LRSchedule(peak=training.learning_rate, end=training.lr_end, warmup_steps=min(training.warmup_steps, steps),
                      total_steps=steps, warmup=training.warmup_schedule, decay=training.lr_scheduler_type)


def train(config: AvaConfig, ds_config: dict, process: ProcessInfo, train_batches: Batches,
          eval_batches: SequenceBatches | None, *, callbacks: Iterable[Callback] = (),
          checkpoint_dir: Path | None = None, resume_from: Path | None = None, verify_checkpoint: bool = True,
          preemption: PreemptionFlag | None = None, faults: FaultPlan | None = None,
          initial_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
          retrieval: RetrievalPlan | None = None, reporter: Reporter | None = None,
          eos_id: int | None = None) -> TrainResult:
    """Train `config.model` under DeepSpeed with `ds_config` on `train_batches`; returns what the run produced.

    Evaluates on `eval_batches` every `eval_steps` (and at the end), keeps the
    best checkpoint, stops early after `early_stopping_patience` evaluations
    without improvement and ends with a greedy sample. With `checkpoint_dir`,
    checkpoints are written on `save_strategy`'s schedule and the final one is
    reloaded to prove it restores the same model; `resume_from` continues
    exactly where that checkpoint stopped. `preemption` turns a stop signal
    into checkpoint-and-stop; `faults` injects faults for tests.
    `initial_weights()` (training.init_from) replaces the random
    initialisation; `retrieval` gives batches their neighbours and document
    ids. `callbacks` run after the standard ones, and see every record.
    `eos_id` (the data's end-of-document token) delimits documents for the
    loss penalties (`training.repetition_penalty_weight` and the others).
    """
    started = time.perf_counter()
    t, say = config.training, reporter or _Silent()
    penalties = LossPenalties.from_training(t, eos_id)  # first: a penalty the data cannot take stops the run here
    if penalties is not None:
        say.note(f"loss penalties: {', '.join(penalties.names)} added to the training loss and logged by name "
                 "(lm_loss and evaluation stay the language-model loss)")
    torch.manual_seed(config.data.shuffle_seed)
    model = AvaForCausalLM(config.model, gradient_checkpointing=t.gradient_checkpointing)
    if initial_weights is not None and resume_from is None:  # a resumed run's checkpoint replaces them anyway
        load_state_exactly(model, initial_weights(), f"training.init_from {t.init_from}", allow_feature_added=True)
    lora_scaling, parameters, warnings = prepare_trainable(model, t.lora, from_scratch=t.init_from is None)
    say.note(parameters.line())
    for warning in warnings:
        say.warn(warning)
    batch_context = None
    if retrieval is not None:  # the store's vectors come from the embedding the run starts from
        batch_context = retrieval.open(model.embed_tokens.weight.detach(), process.rank, process.world_size, say.note)
    accumulation = ds_config["gradient_accumulation_steps"]
    steps = total_steps(t, train_batches.batches_per_epoch, accumulation)
    # Counted before expert parallelism keeps only this rank's experts.
    flops_per_token = summarise_model(model, config.data.max_length).training_flops_per_token
    quantization = prepare_quantization(model, config.quantization)  # QAT: fake-quantized Linear layers
    if quantization is not None:
        say.note(quantization.start_note())
    engine = build_engine(model, config, ds_config, compile_setting=t.compile, note=say.note, warn=say.warn)
    health = HealthMonitor(t.gradient_health) if t.gradient_health.enabled else None
    optimizer = OptimizerStep(engine.engine, lr_schedule(t, steps), health, config.model.router_bias_update_rate)
    measure_layers = health is not None and t.gradient_health.layer_grad_norms
    steps_module = LanguageModelSteps(
        engine, optimizer, train_batches, eval_batches, accumulation=accumulation,
        tokens_per_step=ds_config["train_batch_size"] * config.data.max_length, flops_per_token=flops_per_token,
        reports_router_loss=config.model.is_moe or config.model.routes_attention, measure_update=measure_layers,
        batch_context=batch_context, faults=faults, rank=process.rank,
        penalties=penalties)
    per_epoch = max(1, train_batches.batches_per_epoch // accumulation)
    # The decay horizon travels in checkpoints: a resume with another max_steps keeps it (no LR jump).
    first: list[Callback] = [LRHorizon(optimizer, lambda horizon: lr_schedule(t, horizon))]
    if measure_layers:
        first.append(LayerGradNorms())
    if health is not None:
        first.append(GradientHealth(health, t.gradient_health, accumulation, t.save_steps, t.save_strategy))
    if eval_batches is not None:
        every = {"steps": t.eval_steps, "epoch": per_epoch, "no": 0}[t.eval_strategy]
        first.append(Evaluation(every, t.early_stopping_patience, t.early_stopping_threshold, t.sample_max_new_tokens,
                                held_out=eval_batches.fingerprint()))
    last: list[Callback] = []  # after the caller's: a stop they ask for still gets its final checkpoint
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(checkpoint_dir, process.rank, t.keep_last_checkpoints, faults)
        save_every = {"steps": t.save_steps, "epoch": per_epoch, "best": 0, "no": 0}[t.save_strategy]
        last.append(Checkpointing(save_every, saves_at_end=t.save_strategy != "best",
                                  save_best=t.save_best_checkpoint or t.save_strategy == "best",
                                  keep_last=t.keep_last_checkpoints, verify_reload=verify_checkpoint))
    if preemption is not None:
        last.append(Preemption(preemption))
    if quantization is not None:  # last: it converts the model in place, after the final checkpoint
        last.append(QuantizedEvaluation(engine.module, quantization, has_held_out=eval_batches is not None,
                                        exports_best=t.save_strategy == "best"))
    trainer = Trainer(steps_module, steps, logging_steps=t.logging_steps, callbacks=[*first, *callbacks, *last],
                      checkpointer=checkpointer, rank=process.rank, started=started)
    r = trainer.result  # known before the first step, so on_train_end sees it too
    r.model, r.precision, r.parameters, r.lora_scaling, r.warnings = (engine.module, engine.precision, parameters,
                                                                      lora_scaling, warnings)
    return trainer.fit(resume_from)

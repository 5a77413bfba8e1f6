"""Whether a run's estimated memory fits its device (`hardware.memory_gb`), and what would make it fit.

The verdict is what `ava config validate` (an error), a dry run and the start
of a run (a warning) and `ava model summary` show. Each fix is the estimate
recomputed with one setting changed, so its number is what that change buys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ava.config.schema.model import ModelConfig
from ava.model.memory_estimate import (
    GiB,
    MemoryEstimate,
    ParameterCounts,
    TrainingSetup,
    estimate_memory,
    parameter_counts,
    size_text,
)

if TYPE_CHECKING:
    from ava.config.schema import DeepSpeedSection, TrainingConfig

MAX_GPUS = 4096  # the largest data-parallel size a fix proposes


@dataclass(frozen=True)
class Fix:
    """One change and the total per device it gives."""

    change: str
    total: int
    fits: bool
    note: str = ""

    def text(self) -> str:
        verdict = "fits" if self.fits else "still too large"
        return f"{self.change}: {size_text(self.total)} ({verdict}{'; ' + self.note if self.note else ''})"


@dataclass(frozen=True)
class MemoryVerdict:
    """An estimate, the device memory it is held to (GiB; None = unknown) and, when it does not fit, the fixes."""

    estimate: MemoryEstimate
    model: ModelConfig
    counts: ParameterCounts
    memory_gb: float | None
    source: str = "hardware.memory_gb"
    fixes: list[Fix] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return self.estimate.fits(self.memory_gb)

    def _against(self) -> str:
        if self.memory_gb is None:
            return "(no verdict: hardware.memory_gb is not set; a hardware config with memory_gb gives one)"
        verdict = "fits" if self.fits else "does NOT fit"
        return f"of {self.memory_gb:g} GiB ({self.source}): {verdict}"

    def line(self) -> str:
        """One line: the total, the verdict, the largest term."""
        name, value = self.estimate.largest
        return (f"memory per device (estimate): {size_text(self.estimate.total)} {self._against()}; largest term "
                f"{name} {size_text(value)}")

    def table(self) -> list[str]:
        """Every term with what it counts, then the total and the verdict."""
        e = self.estimate
        rows = [(name, value, describe_term(name, self.model, self.counts, e)) for name, value in e.terms.items()]
        rows.append(("margin", e.margin, "1 GiB CUDA context, cuBLAS and NCCL workspaces + 10% of activations "
                                         "and logits for allocator fragmentation"))
        lines = ["memory per device (estimate; the formulas: ava/model/memory_estimate.py):"]
        lines += [f"  {name:<12}{size_text(value):>13}  {text}" for name, value, text in rows]
        lines.append(f"  {'total':<12}{size_text(e.total):>13}  {self._against()}")
        if e.host:
            lines.append(f"  {'host':<12}{size_text(e.host):>13}  offloaded to CPU memory (not in the total)")
        return lines

    def problem(self) -> tuple[str, str] | None:
        """(message, fix) when the estimate does not fit; None when it fits or the memory is unknown."""
        if self.fits is not False:
            return None
        name, value = self.estimate.largest
        message = (f"the run is estimated to need {size_text(self.estimate.total)} per device, more than "
                   f"hardware.memory_gb = {self.memory_gb:g} GiB ({self.source}); the largest term is {name}, "
                   f"{size_text(value)} ({describe_term(name, self.model, self.counts, self.estimate)})")
        fixes = "; ".join(f.text() for f in self.fixes) or "no single change found"
        return message, f"each change alone, per device: {fixes}"

    def warning(self) -> str | None:
        """`problem` as one warning paragraph; None when it fits or the memory is unknown."""
        problem = self.problem()
        return f"{problem[0]}. Fix: {problem[1]}" if problem is not None else None


def describe_term(name: str, model: ModelConfig, counts: ParameterCounts, e: MemoryEstimate) -> str:
    """What a term counts, in the setup's own numbers."""
    s = e.setup or TrainingSetup(micro_batch=1, sequence_length=1)
    b = s.dtype_bytes
    dtype = "fp32" if b == 4 else ("bf16 (fp8 trains on bf16 weights)" if s.precision == "fp8" else s.precision)
    ranks = f"{s.data_parallel} rank(s)"
    offloaded = s.offload and s.zero_stage >= 1
    if name == "weights":
        where = f"partitioned over {ranks}" if s.zero_stage == 3 else "whole on every rank"
        host = ", offloaded to the host" if offloaded and s.zero_stage == 3 else ""
        return f"{dtype} weights of {_count(counts.total)} parameters, {where}{host} (ZeRO-{s.zero_stage})"
    if name == "gradients":
        where = f"partitioned over {ranks}" if s.zero_stage >= 2 else "whole until the reduction"
        return f"{b}-byte gradients of {_count(counts.trainable)} trainable parameters, {where}"
    if name == "optimizer":
        if offloaded:
            return "on the host (deepspeed.cpu_offload/nvme_offload): none on the device"
        per = 8 if s.precision == "fp32" and s.zero_stage == 0 else 16
        share = f" / {s.data_parallel} rank(s)" if s.zero_stage >= 1 else ""
        return (f"{per} bytes x {_count(counts.trainable)} trainable parameters{share}: Adam m and v"
                + (", fp32 master weights and the fp32 gradients the step reads" if per == 16 else ""))
    if name == "activations":
        blocks = f"{model.num_layers} blocks" + (f" + {len(model.cross_attention_layers)} cross-attention"
                                                  if model.cross_attention_layers else "")
        ckpt = "on" if s.gradient_checkpointing else "off"
        return f"micro batch {s.micro_batch} x {s.sequence_length} tokens, {blocks}, gradient checkpointing {ckpt}"
    if name == "logits":
        per = b + 12 + (4 if s.loss_penalties else 0)
        return (f"{s.micro_batch} x {s.sequence_length} tokens x vocabulary {model.vocab_size:,} x {per} bytes: the "
                "logits, fp32 log-softmax and its gradients" + (", the loss penalties' fp32 logits"
                                                                 if s.loss_penalties else ""))
    parts = e.parts
    text = f"DeepSpeed reduce buckets {size_text(parts.get('buffers.reduce_buckets', 0))}"
    if s.zero_stage == 3:
        text += (f", ZeRO-3 gathered parameters {size_text(parts.get('buffers.gathered_parameters', 0))} and "
                 f"persistent small ones {size_text(parts.get('buffers.persistent_parameters', 0))}")
    return text


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def check_memory(model: ModelConfig, setup: TrainingSetup, memory_gb: float | None,
                 source: str = "hardware.memory_gb", counts: ParameterCounts | None = None,
                 with_fixes: bool = True) -> MemoryVerdict:
    """The estimate of `setup` held to `memory_gb`; the fixes are worked out only when it does not fit."""
    counts = counts or parameter_counts(model)
    estimate = estimate_memory(model, setup, counts)
    verdict = MemoryVerdict(estimate, model, counts, memory_gb, source)
    if verdict.fits is False and with_fixes:
        verdict.fixes.extend(_fixes(model, setup, counts, memory_gb * GiB))  # type: ignore[operator]
    return verdict


def check_run_memory(model: ModelConfig, training: TrainingConfig, deepspeed: DeepSpeedSection, sequence_length: int,
                     world_size: int, memory_gb: float | None, source: str = "hardware.memory_gb",
                     with_fixes: bool = True) -> MemoryVerdict:
    """`check_memory` of a run from its sections (LoRA's frozen base counted as frozen)."""
    setup = TrainingSetup.from_sections(training, deepspeed, sequence_length, world_size)
    return check_memory(model, setup, memory_gb, source, parameter_counts(model, training.lora), with_fixes)


def _fixes(model: ModelConfig, s: TrainingSetup, counts: ParameterCounts, limit: float) -> list[Fix]:
    """Each change alone: ZeRO-3, offload, more GPUs, a smaller micro batch, checkpointing, fewer experts."""
    def total(setup: TrainingSetup, cfg: ModelConfig = model, c: ParameterCounts = counts) -> MemoryEstimate:
        return estimate_memory(cfg, setup, c)

    def fix(change: str, e: MemoryEstimate, note: str = "") -> Fix:
        host = f"{size_text(e.host)} of host memory" if e.host else ""
        return Fix(change, e.total, e.total <= limit, "; ".join(x for x in (note, host) if x))

    out: list[Fix] = []
    if s.zero_stage < 3:
        out.append(fix("ZeRO-3 (deepspeed.zero_stage: 3)", total(replace(s, zero_stage=3))))
    if not s.offload:
        stage = max(s.zero_stage, 1)
        what = "parameters and optimizer state" if stage == 3 else "optimizer state"
        change = ("deepspeed.cpu_offload: true" if stage == s.zero_stage
                  else f"deepspeed.cpu_offload: true with ZeRO-{stage}")
        out.append(fix(f"{change} ({what} on the host)", total(replace(s, zero_stage=stage, offload=True))))
    gpus = _fewest_gpus(s, total, limit)
    if gpus is not None:
        out.append(fix(f"ZeRO-3 over {gpus} GPUs", total(replace(s, zero_stage=3, data_parallel=gpus)),
                       "the global batch grows with them, or the accumulation shrinks"))
    if s.micro_batch > 1:
        fitting = [m for m in range(s.micro_batch - 1, 0, -1) if total(replace(s, micro_batch=m)).total <= limit]
        m = fitting[0] if fitting else 1
        out.append(fix(f"micro batch {m} (training.batch_size; raise gradient_accumulation_steps to keep the "
                       "global batch)", total(replace(s, micro_batch=m))))
    if not s.gradient_checkpointing:
        out.append(fix("gradient checkpointing (training.gradient_checkpointing: true)",
                       total(replace(s, gradient_checkpointing=True))))
    if model.is_moe:
        top_k = 1 if model.router_type == "switch" else model.num_experts_per_token
        options = []
        experts = model.num_experts // 2
        while experts >= max(2, top_k) and experts % max(1, s.expert_parallel) == 0:
            cfg = model.model_copy(update={"num_experts": experts})
            options.append((experts, total(s, cfg, counts.with_experts(experts / model.num_experts))))
            experts //= 2
        if options:
            experts, e = next(((n, e) for n, e in options if e.total <= limit), options[-1])
            out.append(fix(f"model.num_experts: {experts} (from {model.num_experts})", e))
    if out and not any(f.fits for f in out):
        together = replace(s, zero_stage=3, offload=True, gradient_checkpointing=True, micro_batch=1)
        out.append(fix("all of ZeRO-3, cpu_offload, checkpointing and micro batch 1 together", total(together)))
    return out


def _fewest_gpus(s: TrainingSetup, total: Callable[[TrainingSetup], MemoryEstimate], limit: float) -> int | None:
    """The smallest power-of-two data-parallel size above the current one at which ZeRO-3 fits, if any."""
    n = max(2, s.data_parallel * 2)
    while n <= MAX_GPUS:
        if n % max(1, s.expert_parallel) == 0 and total(replace(s, zero_stage=3, data_parallel=n)).total <= limit:
            return n
        n *= 2
    return None

"""Rules that involve more than one key.

Each check names the sections it needs and runs only when those validated,
so one broken section does not hide problems elsewhere.  Checks report the
file:line of the keys involved and a concrete fix.  This module composes the
rules; the rule modules it calls (`feature_checks`, `lora_checks`,
`rlhf_checks`) take their `CheckContext` from `ava.config.check_context`, so
none of them imports this module back.
"""

from __future__ import annotations

from collections.abc import Callable

from ava.config.batch import BatchValue, solve_batch
from ava.config.check_context import CheckContext
from ava.config.errors import Notice
from ava.config.feature_checks import check_features
from ava.config.lora_checks import check_lora_targets
from ava.config.provenance import Layer, Origin
from ava.config.quantization_checks import check_quantization
from ava.config.rlhf_checks import check_rlhf
from ava.config.schema import (
    DataConfig,
    DeepSpeedSection,
    HardwareConfig,
    ModelConfig,
    TrainingConfig,
)


def _model(ctx: CheckContext) -> None:
    m = ctx.sections["model"]
    assert isinstance(m, ModelConfig)
    if m.hidden_size % m.num_attention_heads:
        heads = [h for h in range(1, min(m.hidden_size, 4 * m.num_attention_heads) + 1) if m.hidden_size % h == 0]
        near = sorted(heads, key=lambda h: abs(h - m.num_attention_heads))[:2]
        ctx.problem("model.hidden_size",
                    f"must be divisible by model.num_attention_heads = {m.num_attention_heads} "
                    f"({ctx.where('model.num_attention_heads')}); each head gets hidden_size / heads dimensions",
                    f"use num_attention_heads {' or '.join(map(str, sorted(near)))}, or hidden_size "
                    f"{m.hidden_size - m.hidden_size % m.num_attention_heads + m.num_attention_heads}",
                    m.hidden_size)
    if m.num_attention_heads % m.kv_heads:
        divisors = [h for h in range(1, m.num_attention_heads + 1) if m.num_attention_heads % h == 0]
        ctx.problem("model.num_key_value_heads",
                    f"must divide model.num_attention_heads = {m.num_attention_heads} "
                    f"({ctx.where('model.num_attention_heads')}); each key/value head serves an equal group "
                    "of query heads", f"use one of {', '.join(map(str, divisors))}", m.num_key_value_heads)
    if (m.position_embedding_type == "rope" and not m.hidden_size % m.num_attention_heads
            and m.head_dim % 2):
        ctx.problem("model.position_embedding_type",
                    f"rotary embeddings rotate pairs of dimensions, but each head has hidden_size / "
                    f"num_attention_heads = {m.head_dim} (odd) dimensions",
                    "choose hidden_size and num_attention_heads giving an even head size, or use "
                    "position_embedding_type: learned", m.position_embedding_type)
    if m.is_moe and m.num_experts_per_token > m.num_experts:
        ctx.problem("model.num_experts_per_token",
                    f"a token cannot be routed to more experts than exist: model.num_experts = "
                    f"{m.num_experts} ({ctx.where('model.num_experts')})",
                    f"set num_experts_per_token <= {m.num_experts}, or raise num_experts",
                    m.num_experts_per_token)
    if m.is_moe and m.router_type == "switch" and m.num_experts_per_token != 1:
        ctx.problem("model.router_type",
                    f"switch routing sends each token to exactly one expert, but "
                    f"model.num_experts_per_token = {m.num_experts_per_token} "
                    f"({ctx.where('model.num_experts_per_token')})",
                    f"use router_type: topk for top-{m.num_experts_per_token} routing, "
                    "or set num_experts_per_token: 1", m.router_type)


def _warmup(ctx: CheckContext, t: TrainingConfig) -> None:
    if t.max_steps is None or t.warmup_steps < t.max_steps:
        return
    if ctx.origin("training.warmup_steps").layer < ctx.origin("training.max_steps").layer:
        _shorten_warmup(ctx, t)
    else:
        ctx.problem("training.warmup_steps",
                    f"must be smaller than training.max_steps = {t.max_steps} ({ctx.where('training.max_steps')}); "
                    "otherwise the learning rate never reaches its peak",
                    f"set warmup_steps to at most {t.max_steps - 1} (10% of max_steps, {t.max_steps // 10}, is "
                    "typical), or raise max_steps",
                    t.warmup_steps)


def _shorten_warmup(ctx: CheckContext, t: TrainingConfig) -> None:
    """A warmup from a lower layer than a `max_steps` it does not fit: lower it to 10% of the run, with a note.

    The usual case is a smoke test: `--max_steps 8` on a config whose schedule
    was written for a long run. Lowering `max_steps` in a higher layer says
    "this run is shorter"; a warmup as long as the run would never reach the
    peak learning rate, so it is scaled down the way the batch solver
    re-derives values a lower layer set. Both keys in one layer stay an error:
    there the user wrote the contradiction.
    """
    assert t.max_steps is not None
    was, where = t.warmup_steps, ctx.where("training.warmup_steps")
    t.warmup_steps = t.max_steps // 10
    ctx.origins[("training", "warmup_steps")] = Origin(
        Layer.DERIVED, detail=f"10% of training.max_steps {t.max_steps}; replaces {was} from {where}")
    ctx.notices.append(Notice(
        "note", where, ctx.key("training.warmup_steps"),
        f"lowered from {was} to {t.warmup_steps} (10% of training.max_steps = {t.max_steps} from "
        f"{ctx.where('training.max_steps')}), since a warmup as long as the run never reaches the peak "
        f"learning rate; pass --warmup_steps N (below {t.max_steps}) to choose another"))


def _training(ctx: CheckContext) -> None:
    t = ctx.sections["training"]
    assert isinstance(t, TrainingConfig)
    _warmup(ctx, t)
    if t.lr_end > t.learning_rate:
        ctx.problem("training.lr_end",
                    f"must not exceed training.learning_rate = {t.learning_rate} "
                    f"({ctx.where('training.learning_rate')}); the schedule decays towards lr_end",
                    f"set lr_end to at most {t.learning_rate} (often a tenth of it: {t.learning_rate / 10:g})",
                    t.lr_end)
    if t.eos_penalty_weight > 0 and t.min_sequence_length == 0:
        ctx.problem("training.eos_penalty_weight",
                    "penalises the end token before a document is training.min_sequence_length tokens long, but "
                    f"min_sequence_length is 0 ({ctx.where('training.min_sequence_length')}): it would do nothing",
                    "set training.min_sequence_length (e.g. 20), or eos_penalty_weight: 0", t.eos_penalty_weight)
    h = t.gradient_health
    if h.enabled and h.max_consecutive_bad_steps and t.save_strategy == "no":
        key = "training.gradient_health.max_consecutive_bad_steps"
        ctx.notices.append(Notice(
            "warning", ctx.where(key), ctx.key(key),
            f"{h.max_consecutive_bad_steps} bad steps in a row roll back to the last checkpoint, but "
            f"save_strategy is 'no' ({ctx.where('training.save_strategy')}): such a run would stop as failed "
            "instead. Set save_strategy: steps to make rollback possible, or max_consecutive_bad_steps: 0"))


def _saving(ctx: CheckContext) -> None:
    t = ctx.sections["training"]
    assert isinstance(t, TrainingConfig)
    if t.save_strategy == "best" and t.eval_strategy == "no":
        ctx.problem("training.save_strategy", "'best' saves when the evaluation loss improves, but "
                    f"training.eval_strategy is 'no' ({ctx.where('training.eval_strategy')}): nothing would be saved",
                    "set eval_strategy: steps (with eval_steps) or epoch, or save_strategy: steps", t.save_strategy)


def _lora(ctx: CheckContext) -> None:
    t, m, ds = ctx.sections["training"], ctx.sections["model"], ctx.sections["deepspeed"]
    assert isinstance(t, TrainingConfig) and isinstance(m, ModelConfig) and isinstance(ds, DeepSpeedSection)
    if not t.lora.enabled:
        return
    check_lora_targets(ctx, "training.lora", t.lora, m)
    if t.mixed_precision == "fp8":
        ctx.problem("training.lora.enabled", "LoRA adapters wrap the linear layers that FP8 training converts; "
                    f"the two do not combine (training.mixed_precision is fp8, {ctx.where('training.mixed_precision')})",
                    "train LoRA in bf16 (training.mixed_precision: bf16)", t.lora.enabled)
    if ds.ep_size > 1:
        ctx.problem("training.lora.enabled", f"LoRA runs do not support expert parallelism (deepspeed.ep_size is "
                    f"{ds.ep_size}, {ctx.where('deepspeed.ep_size')})",
                    "set deepspeed.ep_size: 1 (experts are frozen under LoRA anyway)", t.lora.enabled)


def _data(ctx: CheckContext) -> None:
    d, m = ctx.sections["data"], ctx.sections["model"]
    assert isinstance(d, DataConfig) and isinstance(m, ModelConfig)
    if d.max_length > m.max_position_embeddings:
        ctx.problem("data.max_length",
                    f"exceeds model.max_position_embeddings = {m.max_position_embeddings} "
                    f"({ctx.where('model.max_position_embeddings')}), the longest sequence the model accepts",
                    f"set data.max_length <= {m.max_position_embeddings}, or raise max_position_embeddings",
                    d.max_length)


def _precision(ctx: CheckContext) -> None:
    t, h = ctx.sections["training"], ctx.sections["hardware"]
    assert isinstance(t, TrainingConfig) and isinstance(h, HardwareConfig)
    p = t.mixed_precision
    device = f"hardware '{h.name}' ({ctx.where('hardware.name')})"
    if p == "bf16" and not h.bf16:
        ctx.problem("training.mixed_precision", f"{device} has no bfloat16 support",
                    "use mixed_precision: fp16 (with loss scaling) or fp32", p)
    if p == "fp16" and not h.fp16:
        # The hardware config declares the target, so a cluster's config validates anywhere; what DeepSpeed
        # says on the machine itself is `ava doctor`'s fp16 probe, and the way to declare a CPU that has it.
        cpu = h.accelerator == "cpu"
        reason = (f"hardware.fp16 is false ({ctx.where('hardware.fp16')}): DeepSpeed's CPU accelerator trains fp16 "
                  "only where oneDNN has fp16 kernels (CPUs with AVX512-FP16, AMX-FP16 ones included)"
                  if cpu else "the device has no float16 support")
        ctx.problem("training.mixed_precision", f"fp16 is not supported by {device}: {reason}",
                    "use mixed_precision: bf16 (or fp32)" + ("; where `ava doctor` reports 'precision fp16: yes' "
                                                              "on the training machine, set hardware.fp16: true"
                                                              if cpu else ""), p)
    if p == "fp8" and not h.fp8 and h.accelerator != "auto":
        ctx.notices.append(Notice(
            "warning", ctx.where("training.mixed_precision"), ctx.key("training.mixed_precision"),
            f"fp8 requested but {device} has no FP8 matrix units: FP8 will be emulated (correct "
            "numerics, slower than bf16); use it for testing, and bf16 for speed on this hardware"))


def _deepspeed(ctx: CheckContext) -> None:
    ds, t = ctx.sections["deepspeed"], ctx.sections["training"]
    assert isinstance(ds, DeepSpeedSection) and isinstance(t, TrainingConfig)
    if ds.fp8_enabled is not None and ds.fp8_enabled != (t.mixed_precision == "fp8"):
        ctx.problem("deepspeed.fp8_enabled",
                    f"disagrees with the precision {t.mixed_precision!r} "
                    f"({ctx.where('training.mixed_precision')})",
                    "remove fp8_enabled (precision alone decides) or make them agree: precision fp8 "
                    "with fp8_enabled true", ds.fp8_enabled)
    if t.mixed_precision == "fp8" and ds.fp8_backend == "torchao" and ds.fp8_margin:
        ctx.notices.append(Notice(
            "warning", ctx.where("deepspeed.fp8_margin"), ctx.key("deepspeed.fp8_margin"),
            f"fp8_margin {ds.fp8_margin} has no effect with fp8_backend torchao: it is a margin of Transformer "
            "Engine's DelayedScaling, and torchao scales dynamically from each tensor's current maximum. Remove it, "
            "or set fp8_backend: transformer_engine"))
    if not ds.enabled and (ds.zero_stage > 0 or ds.cpu_offload or ds.nvme_offload):
        ctx.problem("deepspeed.enabled", f"is false, but ZeRO stage {ds.zero_stage} / offload is requested "
                    f"({ctx.where('deepspeed.zero_stage')})",
                    "set deepspeed.enabled: true, or zero_stage: 0 and no offload", False)
    if ds.cpu_offload and ds.zero_stage == 0:
        ctx.problem("deepspeed.cpu_offload", "CPU offload needs ZeRO stage 1, 2 or 3, but zero_stage is 0 "
                    f"({ctx.where('deepspeed.zero_stage')})", "set deepspeed.zero_stage: 2 (or 3)", True)
    if ds.nvme_offload and ds.zero_stage != 3:
        ctx.problem("deepspeed.nvme_offload", f"NVMe offload (ZeRO-Infinity) needs zero_stage 3, not "
                    f"{ds.zero_stage} ({ctx.where('deepspeed.zero_stage')})", "set deepspeed.zero_stage: 3", True)
    if ds.nvme_offload and not ds.nvme_path:
        ctx.problem("deepspeed.nvme_offload", "NVMe offload needs a directory to write to",
                    "set deepspeed.nvme_path to a directory on a local NVMe drive, e.g. /local_nvme", True)
    if ds.cpu_offload and ds.nvme_offload:
        ctx.problem("deepspeed.cpu_offload", "cpu_offload and nvme_offload are both on; offload goes to one place",
                    "keep one of them", True)


def _expert_parallel(ctx: CheckContext) -> None:
    ds, m = ctx.sections["deepspeed"], ctx.sections["model"]
    assert isinstance(ds, DeepSpeedSection) and isinstance(m, ModelConfig)
    if ds.ep_size == 1:
        return
    if not m.is_moe:
        ctx.problem("deepspeed.ep_size", f"is {ds.ep_size}, but the model has no experts "
                    f"(model.num_experts = {m.num_experts}, {ctx.where('model.num_experts')})",
                    "set deepspeed.ep_size: 1 for a dense model", ds.ep_size)
    elif m.num_experts % ds.ep_size:
        ctx.problem("deepspeed.ep_size", f"must divide model.num_experts = {m.num_experts} "
                    f"({ctx.where('model.num_experts')}): each rank holds the same number of experts",
                    f"use an ep_size that divides {m.num_experts}", ds.ep_size)
    if ds.zero_stage not in (1, 2):
        why = ("DeepSpeed partitions expert parameters only at stages 1 and 2" if ds.zero_stage == 3 else
               "without ZeRO, DeepSpeed clips with a per-rank gradient norm, not the global one")
        ctx.problem("deepspeed.ep_size", f"expert parallelism (ep_size {ds.ep_size}) needs ZeRO stage 1 or 2, not "
                    f"{ds.zero_stage} ({ctx.where('deepspeed.zero_stage')}): {why}",
                    "use zero_stage 1 or 2 with ep_size > 1, or ep_size 1", ds.ep_size)
    if ctx.world.size % ds.ep_size:
        ctx.problem("deepspeed.ep_size", f"must divide the number of ranks ({ctx.world.size}, "
                    f"{ctx.world.source})", "launch a multiple of ep_size ranks, or lower ep_size", ds.ep_size)


def _batch(ctx: CheckContext) -> None:
    t, ds = ctx.sections["training"], ctx.sections["deepspeed"]
    assert isinstance(t, TrainingConfig) and isinstance(ds, DeepSpeedSection)
    micro = BatchValue("training.batch_size", t.batch_size, ctx.origin("training.batch_size"))
    acc = BatchValue("training.gradient_accumulation_steps", t.gradient_accumulation_steps,
                     ctx.origin("training.gradient_accumulation_steps"))
    glob = BatchValue("deepspeed.train_batch_size", ds.train_batch_size, ctx.origin("deepspeed.train_batch_size"))
    plan, problems = solve_batch(micro, acc, glob, ctx.world)
    ctx.problems.extend(problems)
    if plan is not None:
        ctx.notices.extend(plan.notices)
    ctx.batch = plan


CHECKS: tuple[tuple[tuple[str, ...], Callable[[CheckContext], None]], ...] = (
    (("model",), _model),
    (("training",), _training),
    (("training",), _saving),
    (("training", "model", "deepspeed"), _lora),
    (("data", "model"), _data),
    (("model", "data"), check_features),
    (("training", "hardware"), _precision),
    (("deepspeed", "training"), _deepspeed),
    (("deepspeed", "model"), _expert_parallel),
    (("training", "deepspeed"), _batch),
    (("rlhf", "deepspeed", "model"), check_rlhf),
    (("quantization", "training", "deepspeed"), check_quantization),
)


def run_checks(ctx: CheckContext) -> CheckContext:
    """Run every check whose sections validated."""
    for needs, check in CHECKS:
        if all(ctx.sections.get(name) is not None for name in needs):
            check(ctx)
    return ctx

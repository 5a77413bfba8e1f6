"""Generate the DeepSpeed JSON from a validated configuration -- the only place it is built.

Every value is explicit (never "auto"), so what DeepSpeed runs is exactly what
`ava config deepspeed` prints and what the run directory records.
"""

from __future__ import annotations

from typing import Any

from ava.config.schema import AvaConfig


def build_deepspeed_config(cfg: AvaConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for `deepspeed.initialize(config=...)`."""
    t, ds = cfg.training, cfg.deepspeed
    return _build(cfg, ds.zero_stage, t.batch_size, t.gradient_accumulation_steps, ds.train_batch_size,
                  t.learning_rate, inference=False)


def build_engine_config(cfg: AvaConfig, *, zero_stage: int, micro_batch: int, world_size: int,
                        learning_rate: float | None = None, inference: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of one engine of a multi-model run (RLHF: actor, critic, reference, reward).

    Each engine has its own ZeRO stage and batch (one optimizer step per
    micro batch); everything else -- precision, optimizer, buckets, offload --
    comes from the same validated config as a training run's. `inference`
    leaves out the optimizer: a frozen model that only runs forward.
    """
    return _build(cfg, zero_stage, micro_batch, 1, micro_batch * world_size,
                  cfg.training.learning_rate if learning_rate is None else learning_rate, inference=inference)


def _build(cfg: AvaConfig, zero_stage: int, micro: int, accumulation: int, global_batch: int | None,
           learning_rate: float, inference: bool) -> dict[str, Any]:
    t, ds, hw = cfg.training, cfg.deepspeed, cfg.hardware
    precision = t.mixed_precision
    out: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(t.max_gradient_norm),
        "steps_per_print": ds.steps_per_print,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": ds.optimizer.type,
            "params": {
                "lr": learning_rate,
                "betas": [t.beta1, t.beta2],
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                # FusedAdam is CUDA-only; on CPU DeepSpeed must use torch's AdamW, in its fused form: one
                # kernel over all tensors instead of a Python loop of per-tensor ops (the CPU default).
                **({"torch_adam": True, "fused": True} if hw.accelerator == "cpu" and not ds.cpu_offload else {}),
            },
        },
        # fp8 trains on top of bf16 master weights (torchao float8 keeps bf16 weights).
        "bf16": {"enabled": precision in ("bf16", "fp8")},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": _zero(cfg, zero_stage, offload_optimizer=not inference),
    }
    if precision == "fp16":
        out["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                            "hysteresis": 2, "min_loss_scale": 1})
    if inference:
        del out["optimizer"], out["gradient_clipping"]
    return out


def _zero(cfg: AvaConfig, stage: int, offload_optimizer: bool) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update({
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "allgather_bucket_size": ds.allgather_bucket_size,
        "reduce_bucket_size": ds.reduce_bucket_size,
    })
    if ds.cpu_offload and offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.nvme_offload and offload_optimizer:
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": ds.nvme_path, "pin_memory": True}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
            "stage3_max_live_parameters": ds.stage3_max_live_parameters,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if ds.cpu_offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if ds.nvme_offload:
            zero["offload_param"] = {"device": "nvme", "nvme_path": ds.nvme_path, "pin_memory": True}
    return zero

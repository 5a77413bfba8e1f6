"""One DeepSpeed engine per model of an RLHF stage, each with its own ZeRO stage.

Trained models (actor, critic, reward model being trained) get an optimizer;
frozen ones (reference, reward model scoring PPO) are inference engines: no
optimizer, no gradients, eval mode -- under ZeRO-3 their weights stay
partitioned and are gathered layer by layer for each forward.

Generation is the exception: sampling runs one forward per token, and under
ZeRO-3 each forward would gather every layer again, so a 64-token rollout
would move the whole model 64 times (the slowness users report most in RLHF
with ZeRO-3). `generation_module` gathers the weights once per rollout
instead, through DeepSpeed's own `unwrap_model_for_generation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ava.config.deepspeed_json import build_engine_config
from ava.config.schema import AvaConfig, ModelConfig
from ava.model import AvaForCausalLM
from ava.train.engine.build import Engine
from ava.train.engine.build import build_engine as build_deepspeed_engine
from ava.train.engine.router_balance import add_loads, uses_bias_balancing


@dataclass
class RoleEngine(Engine):
    """A model of the stage, wrapped by DeepSpeed (`ava.train.engine.build`): `role` names it in logs and errors."""

    collects_loads: bool = False  # a trained model with aux_loss_free routing
    # Expert loads of the training forwards since the last optimizer step (see `Updater`).
    pending_loads: list[torch.Tensor] = field(default_factory=list)

    @property
    def role(self) -> str:
        return self.name

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The engine's forward; a trained aux_loss_free model keeps its expert loads for the bias update."""
        with self.autocast():
            out = self.engine(input_ids, **kwargs)
        if self.collects_loads and torch.is_grad_enabled():
            self.pending_loads = add_loads(self.pending_loads, out.moe_stats)
        return out

    @property
    def model_config(self) -> ModelConfig:
        """The model: section of the wrapped model (a policy or a value model)."""
        config = self.engine.module.config
        assert isinstance(config, ModelConfig)
        return config


def build_engine(module: nn.Module, cfg: AvaConfig, role: str, zero_stage: int, *, micro_batch: int,
                 world_size: int, learning_rate: float | None = None, trainable: bool = True) -> RoleEngine:
    """Wrap `module` in a DeepSpeed engine for `role`; a frozen one has no optimizer and no gradients.

    ZeRO stages 1 and 2 partition optimizer state and gradients, which a frozen
    model has none of (DeepSpeed refuses them without an optimizer): a frozen
    model under stage 1 or 2 runs as stage 0, whole on every rank, as it would.
    The engine is built where pre-training builds its own
    (`ava.train.engine.build.build_engine`), without torch.compile: a
    rollout's sequence lengths change every step.
    """
    if not trainable and zero_stage in (1, 2):
        zero_stage = 0
    ds_config = build_engine_config(cfg, zero_stage=zero_stage, micro_batch=micro_batch, world_size=world_size,
                                    learning_rate=learning_rate, inference=not trainable)
    built = build_deepspeed_engine(module, cfg, ds_config, name=role, trainable=trainable, compile_setting=False)
    return RoleEngine(built.name, built.engine, zero_stage, trainable, built.precision, ds_config,
                      collects_loads=trainable and uses_bias_balancing(module))


@contextlib.contextmanager
def generation_module(role: RoleEngine) -> Iterator[AvaForCausalLM]:
    """The plain module to sample from, with every weight present, for one whole rollout.

    Under ZeRO-3 the weights are gathered once on entry (and the per-module
    gather hooks lifted) and partitioned again on exit; other stages hold
    whole weights already.
    """
    if not isinstance(role.module, AvaForCausalLM):
        raise TypeError(f"{role.role} is not a causal LM: it cannot generate")
    if role.zero_stage != 3:
        yield role.module
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    with unwrap_model_for_generation(role.engine) as engine:
        yield engine.module  # the same AvaForCausalLM, its weights now whole


def full_state_dict(role: RoleEngine, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of the engine's module, whole and in float32, on the CPU (collective: all ranks call it).

    Ranks that only take part in the gathers pass `keep=False` and get an empty
    dict, so a large model's full copy is held on one rank only.

    Trained weights come from the optimizer's fp32 master copy (exact even in
    bf16), assembled from ZeRO partitions by DeepSpeed's `safe_get_full_fp32_param`;
    frozen weights (a LoRA base, a reference) are gathered from the module.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in role.module.named_parameters():
        value = safe_get_full_fp32_param(param) if role.trainable and param.requires_grad else None
        if value is not None:
            if keep:
                state[name] = value.float().cpu().clone()
        elif hasattr(param, "ds_id"):  # ZeRO-3 partitioned: gather it (every rank takes part)
            with deepspeed.zero.GatheredParameters([param]):
                if keep:
                    state[name] = param.detach().float().cpu().clone()
        elif keep:
            state[name] = param.detach().float().cpu().clone()
    if not keep:
        return {}
    persistent = set(role.module.state_dict(keep_vars=True))  # names only; buffers are never partitioned
    for name, buffer in role.module.named_buffers():
        if name in persistent:
            state[name] = buffer.detach().cpu().clone()
    return state

"""Expert parallelism under DeepSpeed ZeRO 1/2: process groups, expert parameters, the engine, checkpoints.

The model side (`ava.model.moe.expert_parallel`) moves rows between the
ranks of an expert-parallel group. This module makes DeepSpeed train such a
model the way it trains its own `deepspeed.moe.layer.MoE`:

- groups: DeepSpeed's expert-parallel and expert-data-parallel groups
  (`ep_size_P`), created the way its MoE layer creates them;
- expert parameters carry `allreduce = False` and `group_name = "ep_size_P"`,
  the marks by which DeepSpeed reduces their gradients over the
  expert-data-parallel group only (ranks holding the *same* experts) instead
  of over all data-parallel ranks, and broadcasts them at start-up only within
  that group;
- the optimizer gets them in separate `moe` parameter groups, which ZeRO 1/2
  partition over the expert-data-parallel group;
- the engine: DeepSpeed switches all of this on only when it finds its own
  `MoE` modules in the model (`engine.has_moe_layers`, set while the engine is
  built and read by the ZeRO optimizer it builds next). `expert_parallel_engine`
  sets that flag for Ava's layers, and takes over the engine's saving and
  loading of expert weights, which knows only its own module classes;
- checkpoints: each expert's weights go to their own file, written by one
  rank of the group that holds it, with DeepSpeed's file names
  (`layer_{l}_expert_{e}_mp_rank_00_model_states.pt`); the model-states file
  keeps the rest. Since files are per expert, not per rank, a rank reads back
  exactly the experts it owns, and `expert_parallel_checkpoint_state` can
  rebuild the whole model from them.

DeepSpeed internals this relies on (checked against deepspeed 0.19.8):
`groups._create_expert_and_data_parallel` and the group getters (no public
API creates the groups without DeepSpeed's MoE module), and the engine's
`has_moe_layers`, `num_experts`, `_configure_distributed_model`,
`_save_moe_checkpoint`, `_get_non_moe_state_dict`, `_load_checkpoint` and
`load_module_state_dict`. Each use says why.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ava.model.moe import MoELayer
from ava.model.moe.expert_parallel import ExpertParallel

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")  # DeepSpeed's naming


def _group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of `ep_size` ranks (it parses the size back out of it)."""
    return f"ep_size_{ep_size}"


def _distributed_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer) and m.expert_parallel is not None]


def prepare_expert_parallel(model: nn.Module, ep_size: int,
                            param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None) -> list[Any]:
    """Spread `model`'s experts over expert-parallel groups of `ep_size` ranks; returns what to optimize.

    Call after `deepspeed.init_distributed` and before `deepspeed.initialize`,
    on a model built whole (all experts, the same weights on every rank), and
    pass the result as `model_parameters`. Each rank keeps its own experts
    (the slice of the whole model's, so initialisation does not depend on
    `ep_size`). With `ep_size` 1 nothing changes and the trainable parameters
    are returned as they are.  `param_groups(model)` makes the optimizer's parameter
    groups (weight decay); it is called after the experts are spread, since
    spreading replaces their parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if ep_size == 1:
        return param_groups(model) if param_groups is not None else params
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import groups

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"ep_size is {ep_size}, but the model has no MoE layers to spread over ranks")
    name = _group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        # What deepspeed.moe.layer.MoE.set_deepspeed_parallelism does; no public function does it.
        groups._create_expert_and_data_parallel(ep_size)
    group = groups._get_expert_parallel_group(name)
    ep = ExpertParallel(group, dist.get_rank(group=group), ep_size)
    for layer in layers:
        layer.distribute_experts(ep)
        for p in layer.experts.parameters():
            p.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's mark of an expert parameter
            p.group_name = name  # type: ignore[attr-defined]  # which expert-data-parallel group reduces it
    params = [p for p in model.parameters() if p.requires_grad]  # the expert parameters are new objects
    return split_params_into_different_moe_groups_for_optimizer(
        param_groups(model) if param_groups is not None else {"name": "ava", "params": params})


@contextlib.contextmanager
def expert_parallel_engine(model: nn.Module) -> Iterator[None]:
    """Around `deepspeed.initialize(model=model, ...)`: the engine treats `model`'s distributed experts as MoE.

    The engine decides `has_moe_layers` in `_configure_distributed_model` by
    looking for `deepspeed.moe.layer.MoE` modules, then builds the ZeRO
    optimizer from it (expert parameter groups partitioned and reduced over
    the expert-data-parallel group), the gradient reduction and the
    checkpoint layout. Ava's layers are not DeepSpeed modules, so for the
    time of this block that method also sets the flag when the engine's
    model is `model`; it is restored on exit. A model without distributed
    experts (ep_size 1) is left alone.
    """
    layers = _distributed_layers(model)
    if not layers:
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_distributed_model

    def configure(engine: Any, module: nn.Module) -> None:
        original(engine, module)
        if module is model:
            _adopt(engine, layers)

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original


def _adopt(engine: Any, layers: list[tuple[str, MoELayer]]) -> None:
    """Make `engine` run Ava's distributed MoE layers as it runs its own, checkpoints included.

    The engine's save and load find expert weights only inside its own module
    classes; for Ava's these four methods are wrapped on this engine alone.
    """
    engine.has_moe_layers = True
    engine.num_experts = [layer.num_experts for _, layer in layers]  # a list: the checkpoint format of DeepSpeed >= 0.5
    expert_keys = {f"{name}.experts.{proj}" for name, _ in layers for proj in PROJECTIONS}
    save_moe, load, load_module = engine._save_moe_checkpoint, engine._load_checkpoint, engine.load_module_state_dict
    loading: list[tuple[str, str]] = []

    def save_moe_checkpoint(save_dir: str, tag: str, *args: Any, **kwargs: Any) -> None:
        _save_expert_files(engine, layers, save_dir, tag)
        save_moe(save_dir, tag, *args, **kwargs)

    def non_moe_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in full.items() if k not in expert_keys}  # rank 0's experts are not everyone's

    def load_checkpoint(load_dir: str, tag: str, *args: Any, **kwargs: Any) -> Any:
        loading.append((load_dir, tag))  # load_module_state_dict is not told where it loads from
        try:
            return load(load_dir, tag, *args, **kwargs)
        finally:
            loading.pop()

    def load_module_state_dict(checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if loading:
            checkpoint["module"] = {**checkpoint["module"], **_read_expert_files(engine, layers, *loading[-1])}
        return load_module(checkpoint, *args, **kwargs)

    engine._save_moe_checkpoint = save_moe_checkpoint
    engine._get_non_moe_state_dict = non_moe_state_dict
    engine._load_checkpoint = load_checkpoint
    engine.load_module_state_dict = load_module_state_dict


def _expert_file(engine: Any, save_dir: str, layer_id: int, expert_id: int, tag: str) -> str:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine._get_expert_ckpt_name(save_dir, layer_id, expert_id, tag,
                                                 checkpoint_mp_rank=engine.checkpoint_mp_rank)


def _save_expert_files(engine: Any, layers: list[tuple[str, MoELayer]], save_dir: str, tag: str) -> None:
    """One file per expert of every layer: {"<layer>.experts.<proj>": that expert's (in, out) matrix}.

    Only expert-data-parallel rank 0 writes: the other ranks of that group hold
    the same experts.
    """
    from deepspeed.utils import groups

    for layer_id, (name, layer) in enumerate(layers):
        ep = layer.expert_parallel
        assert ep is not None
        if groups._get_expert_data_parallel_rank(_group_name(ep.size)) != 0:
            continue
        start, _ = ep.owned(layer.num_experts)
        for local in range(layer.experts.num_experts):
            state = {f"{name}.experts.{proj}": weight[local].detach().clone()  # clone: a view saves the whole stack
                     for proj in PROJECTIONS if (weight := getattr(layer.experts, proj)) is not None}
            engine.checkpoint_engine.save(state, _expert_file(engine, save_dir, layer_id, start + local, tag))


def _read_expert_files(engine: Any, layers: list[tuple[str, MoELayer]], load_dir: str,
                      tag: str) -> dict[str, torch.Tensor]:
    """This rank's experts from their per-expert files, stacked as the model holds them."""
    state: dict[str, torch.Tensor] = {}
    for layer_id, (_, layer) in enumerate(layers):
        ep = layer.expert_parallel
        assert ep is not None
        start, stop = ep.owned(layer.num_experts)
        parts: dict[str, list[torch.Tensor]] = {}
        for expert in range(start, stop):
            path = _expert_file(engine, load_dir, layer_id, expert, tag)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: checkpoint {os.path.join(load_dir, tag)} was not "
                                        "written by an expert-parallel run, or is incomplete")
            for key, value in engine.checkpoint_engine.load(path, map_location="cpu").items():
                parts.setdefault(key, []).append(value)
        state.update({key: torch.stack(values) for key, values in parts.items()})
    return state


def expert_parallel_checkpoint_state(point: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights (fp32) from checkpoint directory `point` written with ep_size > 1.

    Every expert of every layer, stacked in expert order, whatever ep_size
    wrote them, plus the rest from the model-states file. DeepSpeed's
    `zero_to_fp32` cannot read such a directory: it takes the per-expert files
    for model-states files of more ranks.
    """
    module_file = point / "mp_rank_00_model_states.pt"
    state = {k: v.float() for k, v in torch.load(module_file, map_location="cpu", weights_only=False)["module"].items()}
    experts: dict[str, list[torch.Tensor]] = {}
    for file in sorted(point.glob("layer_*_expert_*_mp_rank_00_model_states.pt"), key=_layer_and_expert):
        for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
            experts.setdefault(key, []).append(value.float())
    state.update({key: torch.stack(values) for key, values in experts.items()})
    return state


def _layer_and_expert(file: Path) -> tuple[int, int]:
    match = EXPERT_FILE.fullmatch(file.name)
    if match is None:
        raise ValueError(f"{file.name} is not named like DeepSpeed's expert files")
    return int(match[1]), int(match[2])

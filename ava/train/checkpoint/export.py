"""Consolidated weights out of a DeepSpeed checkpoint: an Ava model directory, or a Hugging Face one.

A ZeRO checkpoint holds each rank's shard of the fp32 master weights; DeepSpeed's
own `zero_to_fp32` stitches them back together, offline and on CPU, for every
stage. A stage-0 checkpoint already holds the whole module. Exporting from the
checkpoint rather than from live, partitioned parameters needs no collective,
so it works the same after a run, from any kept checkpoint, or on a laptop.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from ava.config.schema.data import DataConfig
from ava.config.schema.model import ModelConfig
from ava.data.model_tokens import ModelTokens, read_model_tokens, tokens_for_data
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.model.store import load_state_exactly, save_model_dir
from ava.train.checkpoint import store as checkpoint


def resolve_checkpoint(path: Path, which: str = "latest") -> Path:
    """A checkpoint directory from itself, a run's `checkpoints/` directory or a run directory.

    `which` picks, for a run: "latest" (the last complete checkpoint) or "best"
    (the lowest evaluation loss).
    """
    if (path / checkpoint.COMPLETE).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tag = checkpoint.best_tag(root) if which == "best" else checkpoint.latest_complete(root)
    if tag is None:
        what = "best checkpoint (the run never evaluated, or save_best_checkpoint is off)" if which == "best" \
            else "complete checkpoint"
        raise UserError(f"{path} holds no {what}",
                        "point at a run directory or a checkpoints/stepNNNNNNNN directory written to the end")
    return root / tag


def run_model_config(run_dir: Path) -> ModelConfig:
    """The model: section of the run's resolved `config.yaml`."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found, so the model's shape is unknown",
                        "export from inside a run directory written by train.py (it holds config.yaml)")
    try:
        return ModelConfig.model_validate(yaml.safe_load(path.read_text())["model"])
    except (yaml.YAMLError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(f"{path} has no valid model: section ({exc})",
                        "restore the run's config.yaml; it is written at the start of every run") from exc


def checkpoint_state_dict(point: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict held by checkpoint directory `point` (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(point.glob("layer_*_expert_*_model_states.pt")):  # written with deepspeed.ep_size > 1
        from ava.train.engine.expert_parallel import expert_parallel_checkpoint_state

        return expert_parallel_checkpoint_state(point)
    module_file = point / "mp_rank_00_model_states.pt"
    if any(point.glob("*zero_pp_rank_*optim_states.pt")):
        with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints a line per tensor group
            state = get_fp32_state_dict_from_zero_checkpoint(str(point.parent), tag=point.name)
        state = {k: v.float() for k, v in state.items()}
        if module_file.is_file():
            # ZeRO-1 records no frozen parameter (a LoRA run's base weights) beside its fp32 shards; the
            # module state holds them whole (under ZeRO-3 its tensors are empty placeholders, skipped).
            module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
            state.update({k: v.float() for k, v in module.items() if k not in state and v.numel()})
        return state
    if not module_file.is_file():
        raise UserError(f"{point} has neither ZeRO shards nor {module_file.name}: not a DeepSpeed checkpoint",
                        "point at a checkpoints/stepNNNNNNNN directory written by train.py")
    module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


RUN_TOKENIZER_DIR = "tokenizer"  # a run's copy of its tokenizer, written before the first step


def run_tokens(run_dir: Path) -> ModelTokens | None:
    """The run's tokenizer and special ids, for an export from any of its checkpoints.

    First the copy the run wrote at its start (`tokenizer/`), so a checkpoint
    exported mid-run finds it; then its finished `model/`; then, for a run
    older than those copies, rebuilt from its config.yaml's data: section
    (never by training a BPE). None when nothing says.
    """
    for directory in (run_dir / RUN_TOKENIZER_DIR, run_dir / "model"):
        found = read_model_tokens(directory)
        if found is not None:
            return found
    try:
        data = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data")
        return tokens_for_data(DataConfig.model_validate(data or {}))
    except (OSError, yaml.YAMLError, AttributeError, ValidationError):
        return None


def run_lora_scaling(run_dir: Path) -> float | None:
    """alpha / r of the run's training.lora when it trained adapters, else None (read from its config.yaml)."""
    path = run_dir / "config.yaml"
    try:
        lora = (yaml.safe_load(path.read_text()) or {}).get("training", {}).get("lora") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not lora.get("enabled"):
        return None
    return float(lora["alpha"]) / float(lora["rank"])


def run_frozen_base(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """A LoRA run's fp32 pretrained weights (its training.init_from), when it had them and they still exist."""
    try:
        training = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("training", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    init = training.get("init_from")
    if not (training.get("lora") or {}).get("enabled") or not init or not Path(init).exists():
        return None
    from ava.config.pretrained import locate
    from ava.hf.pretrained import load_weights

    return load_weights(locate(init))


def checkpoint_model(point: Path, config: ModelConfig, lora_scaling: float | None = None,
                     frozen_base: dict[str, torch.Tensor] | None = None
                     ) -> tuple[AvaForCausalLM, dict[str, torch.Tensor]]:
    """The model checkpoint `point` holds, with a LoRA run's adapters merged in, and those adapters ({} if none).

    What every reader of a checkpoint's weights builds: the export, and `ava generate`.
    """
    from ava.model.lora import adapter_state, merge_for_export

    state = checkpoint_state_dict(point)
    adapters = adapter_state(state)
    if adapters:
        if lora_scaling is None:
            raise UserError(f"{point} holds LoRA adapters but the run's LoRA settings are unknown",
                            "use the checkpoint inside its run directory, whose config.yaml has training.lora")
        state, adapters = merge_for_export(state, lora_scaling, frozen_base)
    model = AvaForCausalLM(config)
    load_state_exactly(model, state, str(point))
    return model, adapters


def export_checkpoint(point: Path, config: ModelConfig, out: Path, hf: bool = False,
                      dtype: torch.dtype = torch.float32, overwrite: bool = False,
                      lora_scaling: float | None = None,
                      frozen_base: dict[str, torch.Tensor] | None = None,
                      tokens: ModelTokens | None = None) -> str:
    """Write checkpoint `point` as an Ava model directory (or HF with `hf`); returns what was written.

    `tokens` (the run's tokenizer and special ids, `run_tokens`) are written
    beside the weights, so the model leaves with what decodes it.

    A LoRA run's checkpoint holds base weights and adapters; they are merged
    (W + alpha/r * B @ A) into plain weights, and the adapters alone are kept
    beside them as `adapter.safetensors`. Frozen weights have no fp32 master
    copy, so in a bf16 run the checkpoint holds them rounded; `frozen_base`
    (the pretrained fp32 weights, by plain model name) replaces each frozen
    tensor the checkpoint holds unchanged-but-rounded, so only the adapters'
    update differs from the pretrained model.
    """
    from ava.model.lora import save_adapters

    model, adapters = checkpoint_model(point, config, lora_scaling, frozen_base)
    if hf:
        from ava.hf import export_hf

        return export_hf(model, out, dtype=dtype, overwrite=overwrite, tokens=tokens)
    save_model_dir(model.to(dtype), out, overwrite=overwrite)
    with_tokens = ""
    if tokens is not None:
        tokens.save(out)
        with_tokens = "; tokenizer.json" if tokens.tokenizer is not None else ""
        with_tokens += "; special_tokens.json"
    if adapters:
        save_adapters(out, adapters)
        return ("an Ava model directory (ava_model.yaml + model.safetensors, LoRA merged; adapter.safetensors"
                f"{with_tokens})")
    return f"an Ava model directory (ava_model.yaml + model.safetensors{with_tokens})"

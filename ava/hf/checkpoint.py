"""Reading and writing Hugging Face checkpoint weights (safetensors), and writing config.json.

Done with `safetensors` and `json` alone, so converting weights needs neither
`transformers` nor a network: real hub checkpoints are read as they are laid
out on disk (single file, sharded with an index, or a legacy torch pickle).
Reading config.json is `ava.config.hf_config.read_hf_config`: config loading
needs it to adopt an `init_from` checkpoint's architecture without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ava.errors import UserError


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, from model.safetensors, a sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files: list[Path]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif (directory / "pytorch_model.bin").is_file():
        try:
            return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{directory / 'pytorch_model.bin'} cannot be read safely ({exc})",
                            "re-save the model with safetensors (save_pretrained's default)") from exc
    else:
        raise UserError(f"no weights in {directory}: expected model.safetensors, "
                        "model.safetensors.index.json or pytorch_model.bin",
                        "copy the weight files next to config.json")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is listed in {index.name} but missing", "copy every shard")
        try:
            state.update(load_file(str(file)))
        except Exception as exc:
            raise UserError(f"{file} cannot be read ({exc}); it is truncated or corrupt",
                            "re-copy the file") from exc
    return state


def write_hf_dir(directory: Path, config: dict, state: dict[str, torch.Tensor], overwrite: bool) -> None:
    """config.json + model.safetensors; never replaces an existing checkpoint unless asked."""
    from safetensors.torch import save_file

    if (directory / "model.safetensors").exists() and not overwrite:
        raise UserError(f"{directory / 'model.safetensors'} already exists; Ava never overwrites "
                        "a checkpoint silently", "choose a new output directory, or pass --overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors.tmp"), metadata={"format": "pt"})
    (directory / "model.safetensors.tmp").replace(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def take(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    """Remove and return one tensor, with a clear error when the checkpoint lacks it."""
    if key not in state:
        raise UserError(f"{source} has no tensor `{key}`; the weights do not match config.json",
                        "check that config.json belongs to these weights")
    return state.pop(key)

"""An Ava model directory: `ava_model.yaml` (the model config) + `model.safetensors` (the weights).

The unit that HF import produces and HF export reads. safetensors rather than
pickles so loading a file cannot run code. The config file itself is read and
written by `ava.config.model_file`, which needs no torch, so config loading
can read a directory's architecture without importing the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ava.config.model_file import load_model_config, write_model_config
from ava.errors import UserError
from ava.model.transformer import AvaForCausalLM

WEIGHTS_FILE = "model.safetensors"


def save_model_dir(model: AvaForCausalLM, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the model's config and weights; refuses to replace an existing model unless `overwrite`."""
    from safetensors.torch import save_file

    out = Path(directory)
    if (out / WEIGHTS_FILE).exists() and not overwrite:
        raise UserError(f"{out / WEIGHTS_FILE} already exists; Ava never overwrites a model silently",
                        "choose a new output directory, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "ava"})
    tmp.replace(out / WEIGHTS_FILE)
    write_model_config(model.config, out)
    return out


def load_model_dir(directory: str | Path, dtype: torch.dtype = torch.float32) -> AvaForCausalLM:
    """Build the model from its config and load every weight; a missing or extra tensor is an error."""
    from safetensors.torch import load_file

    config = load_model_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found", "copy the weights next to ava_model.yaml, or re-export")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path} cannot be read ({exc}); the file is truncated or corrupt",
                        "restore it from the run's checkpoints or re-export it") from exc
    model = AvaForCausalLM(config)
    load_state_exactly(model, state, str(path))
    return model.to(dtype)


# Parameters an enhanced feature adds to a model that works without them (cross-attention blocks whose gates
# start closed, head routers, the memory gate): a pretrained model without the feature may lack them, and
# they keep their initialisation. Anything else missing is an error.
FEATURE_ADDED = ("cross_blocks.", ".attn.router.", ".attn.memory_gate")


def load_state_exactly(model: AvaForCausalLM, state: dict[str, torch.Tensor], source: str,
                       allow_feature_added: bool = False) -> None:
    """Copy `state` into `model`, reporting every missing, unexpected or mis-shaped tensor at once.

    `allow_feature_added`: a pretrained model may lack the parameters `FEATURE_ADDED` names
    (training.init_from a model without the enhanced features this config turns on).
    """
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    if allow_feature_added:
        missing = [k for k in missing if not any(marker in k for marker in FEATURE_ADDED)]
    extra = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or extra or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                 f"shape mismatches {shapes[:5]}" if shapes else ""]
        raise UserError(f"the weights in {source} do not match the model config: "
                        + "; ".join(p for p in parts if p),
                        "load them with the model config they were saved with")
    model.load_state_dict(state, strict=False)  # completeness was checked above; tied head is absent

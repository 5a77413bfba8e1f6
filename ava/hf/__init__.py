"""Hugging Face interchange: import Llama, Mixtral and GPT-2 checkpoints, export Ava models to them.

This package sits above `ava.config`, `ava.data` (a model's tokenizer:
`ava.hf.tokenizer`) and `ava.model`: it reads a checkpoint's config.json
through `ava.config.hf_config` (the key mapping, which config loading also
needs, without torch) and builds the model here.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from ava.config.hf_config import hf_family, model_config_from_hf, read_hf_config
from ava.data.model_tokens import ModelTokens
from ava.errors import UserError
from ava.hf import gpt2, llama
from ava.hf.checkpoint import read_hf_weights, write_hf_dir
from ava.hf.tokenizer import token_ids, write_hf_tokens
from ava.model.store import load_state_exactly
from ava.model.transformer import AvaForCausalLM

# The weight mapping of each family `ava.config.hf_config.CONFIG_MAPPINGS` reads the config of.
FAMILIES: dict[str, ModuleType] = {"llama": llama, "mixtral": llama, "gpt2": gpt2}


def import_hf(directory: str | Path, dtype: torch.dtype = torch.float32) -> AvaForCausalLM:
    """Build the Ava model equivalent to a local Hugging Face checkpoint, with its weights."""
    source = Path(directory)
    config = model_config_from_hf(source)
    family = FAMILIES[hf_family(read_hf_config(source), source)]
    state = family.state_from_hf(read_hf_weights(source), config, str(source))
    model = AvaForCausalLM(config)
    load_state_exactly(model, {k: v.to(torch.float32) for k, v in state.items()}, str(source))
    return model.to(dtype)


def export_target(model: AvaForCausalLM) -> str:
    """The Hugging Face family that represents this model exactly: llama, mixtral or gpt2."""
    cfg = model.config
    features = [name for name in ("use_moh", "use_moa", "use_rag", "use_cross_attention", "use_episodic_memory")
                if getattr(cfg, name)]
    if features:
        raise UserError(f"this model uses {', '.join(features)}, which Llama, Mixtral and GPT-2 do not have: "
                        "an exported model would silently lose those weights",
                        "keep the Ava model directory (ava_model.yaml + model.safetensors), which holds "
                        "everything; export only models without the enhanced features")
    candidates = {"mixtral" if cfg.is_moe else "llama": llama, "gpt2": gpt2}
    reasons = []
    for name, family in candidates.items():
        blockers = family.export_blockers(cfg)
        if not blockers:
            return name
        reasons.append(f"{name}: {'; '.join(blockers)}")
    raise UserError("this model has no exact Hugging Face equivalent (" + " | ".join(reasons) + ")",
                    "export only models shaped like Llama, Mixtral or GPT-2")


def export_hf(model: AvaForCausalLM, directory: str | Path, dtype: torch.dtype | None = None,
              overwrite: bool = False, tokens: ModelTokens | None = None) -> str:
    """Write `model` as a Hugging Face checkpoint that `from_pretrained` loads; returns the family used.

    `tokens` (the model's tokenizer and special ids) go into config.json,
    generation_config.json and the tokenizer files `AutoTokenizer` loads; an
    unknown id is written as null rather than left to the family's default.
    """
    target = export_target(model)
    family = FAMILIES[target]
    dtype = dtype or model.embed_tokens.weight.dtype
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    out = Path(directory)
    write_hf_dir(out, family.config_to_hf(model.config, dtype) | token_ids(tokens),
                 family.state_to_hf(state, model.config), overwrite)
    write_hf_tokens(tokens, out, model.config.max_position_embeddings)
    return target

"""`training.init_from`: the pretrained checkpoint a run starts from, and the architecture it dictates.

A user fine-tuning GPT-2 points at a directory, as nanoGPT's `init_from`
does, and expects the model to *be* that checkpoint: its shape keys
(width, depth, heads, vocabulary, positions, norm, activation...) come from
the directory, not from the config. Settings that are training choices
(dropout, router loss weights, capacity factor) stay the config's. A shape
key the config sets explicitly to a different value is an error naming both
values, never a silent replacement, because it usually means the wrong
directory or the wrong config.

Ava model directories (and run directories holding `model/`) are read by
`ava.config.model_file`; a Hugging Face directory's `config.json` is mapped by
`ava.config.hf_config`. Only the architecture is read here, never the
weights, so config loading (`ava.config.init_from`) adopts it without
importing torch or the model package; the weights are loaded by
`ava.hf.pretrained.load_weights`, which sits above both the model and the
Hugging Face conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ava.config.hf_config import model_config_from_hf
from ava.config.model_file import CONFIG_FILE, load_model_config
from ava.config.schema.model import ModelConfig
from ava.errors import UserError

SETTING = "training.init_from"

# Training choices that stay the config's when the architecture comes from a checkpoint.
TRAINING_CHOICES = frozenset({
    "attention_dropout", "hidden_dropout", "expert_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef",
    "router_bias_update_rate", "initializer_range", "use_moh", "use_moa", "use_rag", "use_cross_attention",
    "use_episodic_memory", "moh", "moa", "cross_attention", "rag", "episodic_memory",
})
SHAPE_KEYS = tuple(name for name in ModelConfig.model_fields if name not in TRAINING_CHOICES)
FEATURES = ("moh", "moa", "cross_attention", "rag", "episodic_memory")


@dataclass(frozen=True)
class Pretrained:
    """Where the initial weights come from and the architecture they were saved with."""

    path: Path
    kind: str  # "ava" or "hf"
    config: ModelConfig

    def describe(self) -> str:
        what = "Hugging Face checkpoint" if self.kind == "hf" else "Ava model"
        return f"{what} {self.path}"


def locate(path: str | Path) -> Pretrained:
    """Read the architecture of the checkpoint at `path` without loading its weights."""
    p = Path(path)
    candidates = [p, p / "model"]
    for directory in candidates:
        if (directory / CONFIG_FILE).is_file():
            return Pretrained(directory, "ava", load_model_config(directory))
    if (p / "config.json").is_file():
        return Pretrained(p, "hf", model_config_from_hf(p))
    if not p.exists():
        raise UserError(f"{SETTING}: {p} does not exist",
                        "point it at a local model directory: an Ava model (ava_model.yaml + "
                        "model.safetensors), a training run directory, or a Hugging Face GPT-2/Llama/Mixtral "
                        "directory (config.json + weights); hub names cannot be downloaded here")
    raise UserError(f"{SETTING}: {p} holds neither {CONFIG_FILE} (Ava), model/{CONFIG_FILE} (a run) nor "
                    "config.json (Hugging Face)",
                    "point it at the directory that holds the model's config and weights")


def adopt_architecture(config: ModelConfig, source: Pretrained, explicit: set[str],
                       where: dict[str, str]) -> ModelConfig:
    """`config` with the checkpoint's shape keys; a conflicting explicitly set key is an error.

    `explicit` names the model keys a config file or the command line set;
    `where` says where each was set (file:line), for the message.
    """
    conflicts = [name for name in SHAPE_KEYS if name in explicit
                 and getattr(config, name) != getattr(source.config, name)]
    if conflicts:
        shown = "; ".join(f"model.{n} = {getattr(config, n)!r} ({where.get(n, 'config')}) but the checkpoint has "
                          f"{getattr(source.config, n)!r}" for n in conflicts)
        raise UserError(f"{SETTING}: the config's model shape differs from {source.describe()}: {shown}",
                        "remove those keys from the model: section (the checkpoint decides the architecture "
                        "when init_from is set), or point init_from at the checkpoint you meant")
    shape: dict[str, Any] = {name: getattr(source.config, name) for name in SHAPE_KEYS}
    for feature in FEATURES:  # what the checkpoint was trained with carries over unless the config says otherwise
        switch = f"use_{feature}"
        if getattr(source.config, switch) and switch not in explicit:
            shape[switch] = True
            if feature not in explicit:
                shape[feature] = getattr(source.config, feature)
    adopted = config.model_copy(update=shape)
    if adopted.use_moa != source.config.use_moa:
        have = "uses" if source.config.use_moa else "does not use"
        raise UserError(
            f"{SETTING}: {source.describe()} {have} MoA, and model.use_moa = {adopted.use_moa} "
            f"({where.get('use_moa', 'config')}): MoA's per-expert query and output projections cannot be made "
            "from standard attention's, nor the reverse",
            f"set model.use_moa: {str(source.config.use_moa).lower()}, or point init_from at a model trained "
            f"{'with' if adopted.use_moa else 'without'} MoA")
    return adopted

"""The models of an RLHF pipeline: policies, value models (reward model, critic), and their directories.

A value model is the Ava transformer without its output head plus a scalar
head on the final hidden state: a reward model reads it at a sequence's last
token, a critic at every token. Its directory is an Ava model directory
(`ava_model.yaml`, `model.safetensors` with the trunk) plus
`value_head.safetensors`, so the trunk stays readable by every Ava tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ava.config.model_file import CONFIG_FILE, load_model_config, write_model_config
from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.model.attention_interface import AttentionLayer
from ava.model.moe import MoEStats
from ava.model.store import WEIGHTS_FILE, load_model_dir, load_state_exactly, save_model_dir

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class ValueOutput:
    values: torch.Tensor  # (batch, seq) float32: the head's output at every position
    router_loss: torch.Tensor | None
    moe_stats: list[MoEStats] = field(default_factory=list)


class AvaValueModel(nn.Module):
    """Transformer trunk + scalar head: a reward model or a PPO critic."""

    def __init__(self, config: ModelConfig, gradient_checkpointing: bool = False, head_std: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.trunk = AvaForCausalLM(config, gradient_checkpointing=gradient_checkpointing)
        del self.trunk.lm_head  # never read: an unused head would only confuse ZeRO's gradient bookkeeping
        self.value_head = nn.Linear(config.hidden_size, 1)
        with torch.no_grad():
            nn.init.normal_(self.value_head.weight, 0.0, head_std) if head_std else self.value_head.weight.zero_()
            self.value_head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> ValueOutput:
        hidden, stats, attention_stats = self.trunk.hidden_states(input_ids, segment_ids=segment_ids)
        values = self.value_head(hidden).squeeze(-1).float()
        routed = [s.router_loss for s in (*stats, *attention_stats)]
        router_loss = torch.stack(routed).sum() if routed else None
        return ValueOutput(values, router_loss, stats)


def trunk_state(policy_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A policy's weights without the output head: what a value model's trunk loads."""
    return {k: v for k, v in policy_state.items() if not k.startswith("lm_head.")}


def value_model_from_policy(policy: AvaForCausalLM, head_std: float = 0.0) -> AvaValueModel:
    """A value model whose trunk starts as `policy`'s and whose head starts at `head_std` (0: values start at 0)."""
    model = AvaValueModel(policy.config, policy.gradient_checkpointing, head_std)
    model.trunk.load_state_dict(trunk_state(policy.state_dict()), strict=True)
    return model


def model_dir(path: str | Path, setting: str) -> Path:
    """An Ava model directory from itself or from a run (or RLHF stage) directory holding `model/`."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    if (p / "model" / CONFIG_FILE).is_file():
        return p / "model"
    if not p.exists():
        raise UserError(f"{setting}: {p} does not exist",
                        "point it at an Ava model directory (ava_model.yaml + model.safetensors), a training "
                        "run directory, or an RLHF stage directory")
    raise UserError(f"{setting}: {p} is not an Ava model directory (no {CONFIG_FILE}, nor model/{CONFIG_FILE})",
                    "point it at a run's model/ directory, or convert a Hugging Face model first with "
                    "`ava model import-hf SRC --out DIR`")


def is_value_model(directory: Path) -> bool:
    return (directory / VALUE_HEAD_FILE).is_file()


def _require_kind(directory: Path, setting: str, value: bool) -> None:
    if value and not is_value_model(directory):
        raise UserError(f"{setting}: {directory} has no {VALUE_HEAD_FILE}, so it is not a reward model",
                        "train one with the reward stage (rlhf.stages: [reward]) and point at its model/")
    if not value and is_value_model(directory):
        raise UserError(f"{setting}: {directory} holds a reward model (a scalar head), not a policy",
                        "point it at the policy: the sft/ (or dpo/, ppo/, grpo/) stage's model, or a training run")


def check_model_dir(path: str | Path, setting: str, value: bool = False) -> Path:
    """Check a policy (or, with `value`, a reward model) directory without reading its weights.

    The config must validate and the weight file's tensor names and shapes
    must be the model's (read from the safetensors header; the model is built
    on the meta device), so a pipeline can check every model it will load, on
    every rank, in moments, whatever their size.
    """
    from safetensors import safe_open

    directory = model_dir(path, setting)
    _require_kind(directory, setting, value)
    config = load_model_config(directory)
    with torch.device("meta"):
        model: nn.Module = AvaValueModel(config).trunk if value else AvaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    try:
        with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k != "lm_head.weight"
                     or not config.tie_word_embeddings}
    except Exception as exc:  # a missing, truncated or corrupt file: safetensors' own error types
        raise UserError(f"{setting}: {directory / WEIGHTS_FILE} cannot be read ({exc})",
                        "restore the model directory, or re-export it") from exc
    if found != expected:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shapes = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise UserError(f"{setting}: the weights in {directory} do not match its {CONFIG_FILE} (missing "
                        f"{missing[:3]}, unexpected {extra[:3]}, other shapes {shapes[:3]})",
                        "keep ava_model.yaml beside the weights it was written with")
    return directory


def load_policy(path: str | Path, setting: str) -> AvaForCausalLM:
    """The causal LM in `path`; a reward-model directory is refused by name."""
    directory = model_dir(path, setting)
    _require_kind(directory, setting, value=False)
    return load_model_dir(directory)


def load_value_model(path: str | Path, setting: str) -> AvaValueModel:
    """The reward model (or critic) in `path`: trunk weights plus `value_head.safetensors`."""
    from safetensors.torch import load_file

    directory = model_dir(path, setting)
    _require_kind(directory, setting, value=True)
    model = AvaValueModel(load_model_config(directory))
    try:
        trunk, head = load_file(str(directory / WEIGHTS_FILE)), load_file(str(directory / VALUE_HEAD_FILE))
        model.trunk.load_state_dict(trunk, strict=True)
        model.value_head.load_state_dict(head, strict=True)
    except (RuntimeError, OSError) as exc:  # safetensors header errors and missing/mismatched tensors
        raise UserError(f"{setting}: the weights in {directory} cannot be loaded: {exc}",
                        "re-run the reward stage, or restore the directory from its run") from exc
    return model


def save_policy(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path) -> Path:
    """Write a policy's full (consolidated) state as an Ava model directory."""
    model = AvaForCausalLM(config)
    load_state_exactly(model, state, f"the {directory.parent.name} stage's consolidated weights")
    return save_model_dir(model, directory, overwrite=True)


def save_value_model(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path) -> Path:
    """Write a value model's full state: the trunk as an Ava model directory, the head beside it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    trunk = {k.removeprefix("trunk."): v.contiguous() for k, v in state.items() if k.startswith("trunk.")}
    head = {k.removeprefix("value_head."): v.contiguous() for k, v in state.items() if k.startswith("value_head.")}
    save_file(trunk, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "producer": "ava"})
    save_file(head, str(directory / VALUE_HEAD_FILE), metadata={"format": "pt", "producer": "ava"})
    write_model_config(config, directory)
    return directory


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability to 0 (module and attention): rollout and update must see one policy."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p:
            module.p, count = 0.0, count + 1
        # Attention dropout is a probability each attention kind hands SDPA itself (standard, MoH, MoA, memory).
        if isinstance(module, AttentionLayer) and isinstance(getattr(module, "dropout", None), float) \
                and module.dropout:
            setattr(module, "dropout", 0.0)  # noqa: B010  (a float attribute, which nn.Module's typing hides)
            count += 1
    return count


def head_std_for(hidden_size: int) -> float:
    """The reward head's initial std: 1/sqrt(hidden + 1), as TRL initialises a score head."""
    return 1.0 / math.sqrt(hidden_size + 1)

"""LoRA adapters on an Ava model through `peft`, and merging them back into plain weights.

peft's `inject_adapter_in_model` wraps the named `nn.Linear` layers of any
module (no Hugging Face model class needed) and freezes everything else. A
trained adapter is merged, W + (alpha / r) * B @ A, into an ordinary Ava state
dict, so what a LoRA run writes loads, exports and fine-tunes like any other
Ava model; the adapter alone is kept too. MoE experts are stacked tensors,
not linear layers, so they take no adapter (the config check says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ava.model.errors import ModelInputError

ADAPTER = "default"  # peft's adapter name; one adapter per model here
_BASE, _A, _B = ".base_layer.weight", f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


@dataclass(frozen=True)
class ParameterReport:
    """Counts a user checks before a LoRA run: is only the adapter training?"""

    total: int
    trainable: int
    lora: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        return (f"parameters: {self.total:,} total, {self.trainable:,} trainable ({self.trainable_percent:.2f}%), "
                f"{self.lora:,} in LoRA adapters")


def parameter_report(model: nn.Module) -> ParameterReport:
    params = list(model.named_parameters())
    return ParameterReport(total=sum(p.numel() for _, p in params),
                           trainable=sum(p.numel() for _, p in params if p.requires_grad),
                           lora=sum(p.numel() for n, p in params if ".lora_" in n))


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> float:
    """Wrap `target_modules` of `model` in LoRA adapters (in place) and freeze the rest; returns alpha / r.

    The adapter's B starts at zero, so the adapted model computes exactly what
    the base model did until the first update.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ModelInputError("LoRA needs the `peft` package, which is not installed",
                              "pip install peft (or re-run scripts/setup.sh, which installs it)") from exc
    try:
        config = LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
                            lora_dropout=dropout, target_modules=list(target_modules))
        inject_adapter_in_model(config, model)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ModelInputError(f"LoRA target modules {target_modules} do not match the model: {exc}",
                              "choose rlhf.lora.target_modules among q_proj, k_proj, v_proj, o_proj and, for a "
                              "dense FFN, gate_proj, up_proj, down_proj") from exc
    return alpha / rank


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA-wrapped model's state dict as the plain model's: each adapted weight merged, adapter tensors gone."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((_A, _B)):
            continue
        if key.endswith(_BASE):
            prefix = key[: -len(_BASE)]
            a, b = state[prefix + _A].float(), state[prefix + _B].float()
            merged[prefix + ".weight"] = (value.float() + scaling * (b @ a)).to(value.dtype)
        elif ".base_layer." in key:  # the wrapped layer's bias
            merged[key.replace(".base_layer.", ".")] = value
        else:
            merged[key] = value
    return merged


def lora_base_state(wrapped: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The non-adapter entries of a LoRA-wrapped state dict, taken from the plain model's state `base`."""
    out = {}
    for key in wrapped:
        if not key.endswith((_A, _B)):
            out[key] = base[key.replace(".base_layer.", ".")]
    return out


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of a LoRA-wrapped model's state dict (what `adapter.safetensors` holds)."""
    return {k: v for k, v in state.items() if k.endswith((_A, _B))}

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
from pathlib import Path

import torch
from torch import nn

from ava.config.schema.lora import TrainingLoRAConfig
from ava.errors import UserError
from ava.model.store import FEATURE_ADDED

ADAPTER = "default"  # peft's adapter name; one adapter per model here
_BASE, _A, _B = ".base_layer.weight", f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


@dataclass(frozen=True)
class ParameterReport:
    """Counts a user checks before a LoRA run: is only the adapter training?"""

    total: int
    trainable: int
    lora: int
    embeddings_trainable: int = 0
    head_trainable: int = 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def lora_percent(self) -> float:
        return 100.0 * self.lora / self.total if self.total else 0.0

    def line(self) -> str:
        return (f"parameters: {self.total:,} total, {self.trainable:,} trainable ({self.trainable_percent:.2f}%), "
                f"{self.total - self.trainable:,} frozen, {self.lora:,} in LoRA adapters ({self.lora_percent:.2f}%)")

    def as_dict(self) -> dict[str, float]:
        return {"total": self.total, "trainable": self.trainable, "frozen": self.total - self.trainable,
                "lora": self.lora, "trainable_percent": self.trainable_percent, "lora_percent": self.lora_percent,
                "embeddings_trainable": self.embeddings_trainable, "head_trainable": self.head_trainable}


_EMBEDDINGS = ("embed_tokens.", "embed_positions.")
_HEAD = ("lm_head.", "norm.")  # the final norm feeds only the head


def parameter_report(model: nn.Module) -> ParameterReport:
    """Counted once per tensor: tied embedding/head weights are one parameter."""
    params = list(model.named_parameters())  # named_parameters already yields a shared tensor once
    trainable = [(n, p) for n, p in params if p.requires_grad]
    return ParameterReport(total=sum(p.numel() for _, p in params),
                           trainable=sum(p.numel() for _, p in trainable),
                           lora=sum(p.numel() for n, p in params if ".lora_" in n),
                           embeddings_trainable=sum(p.numel() for n, p in trainable if n.startswith(_EMBEDDINGS)),
                           head_trainable=sum(p.numel() for n, p in trainable if n.startswith(_HEAD)))


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> float:
    """Wrap `target_modules` of `model` in LoRA adapters (in place) and freeze the rest; returns alpha / r.

    The adapter's B starts at zero, so the adapted model computes exactly what
    the base model did until the first update.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise UserError("LoRA needs the `peft` package, which is not installed",
                        "pip install peft (or re-run scripts/setup.sh, which installs it)") from exc
    try:
        config = LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
                            lora_dropout=dropout, target_modules=list(target_modules))
        inject_adapter_in_model(config, model)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise UserError(f"LoRA target modules {target_modules} do not match the model: {exc}",
                        "choose lora.target_modules (training.lora or rlhf.lora) among q_proj, k_proj, "
                        "v_proj, o_proj and, for a dense FFN, gate_proj, up_proj, down_proj") from exc
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


ADAPTER_FILE = "adapter.safetensors"


def merge_for_export(state: dict[str, torch.Tensor], scaling: float,
                     frozen_base: dict[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA-wrapped model's trained state as (the plain model's merged weights, the adapters alone).

    The one merge every LoRA export goes through (a train.py run's model/, an
    RLHF stage's model/). Frozen weights have no fp32 master copy, so in a
    bf16 or fp16 run the state holds them rounded; `frozen_base` (the fp32
    starting weights, by plain name) replaces each base tensor the state holds
    unchanged-but-rounded, so the merged model differs from the one it started
    from only by what training changed.
    """
    adapters = adapter_state(state)
    if frozen_base is not None:
        state = {**state, **_unrounded(state, frozen_base)}
    return merge_lora_state(state, scaling), adapters


def _unrounded(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 starting tensor for every state tensor that is that tensor rounded to bf16 or fp16 (or equal)."""
    out = {}
    for key, value in state.items():
        original = base.get(key.replace(".base_layer.", "."))
        if original is None or original.shape != value.shape:
            continue
        for low in (torch.bfloat16, torch.float16):
            if torch.equal(original.to(low).float(), value.float()):
                out[key] = original.float()
                break
    return out


def save_adapters(directory: Path, adapters: dict[str, torch.Tensor]) -> None:
    """The adapters alone beside the merged model (`adapter.safetensors`), for whoever wants them unmerged."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapters.items()}, str(directory / ADAPTER_FILE))


def apply_training_lora(model: nn.Module, lora: TrainingLoRAConfig) -> float:
    """LoRA for train.py: adapters on `lora.target_modules`, then what else trains; returns alpha / r.

    peft freezes every non-adapter weight; `freeze_base: false` unfreezes them
    all again (full fine-tuning plus adapters, what the BEHRT guide's first
    failure did by accident), and `train_embeddings`/`train_head` unfreeze just
    the embeddings or the output head and final norm. What the enhanced features
    add (cross-attention blocks, head and attention-expert routers, the memory
    gate) always trains: it is new to the model, like an adapter, and frozen
    closed gates would keep the adapters inside the cross-attention blocks at a
    zero gradient.
    """
    scaling = apply_lora(model, lora.rank, lora.alpha, lora.dropout, list(lora.target_modules))
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    head = _HEAD + (("embed_tokens.",) if tied else ())  # a tied head *is* the token embedding
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        param.requires_grad_(not lora.freeze_base or (lora.train_embeddings and name.startswith(_EMBEDDINGS))
                             or (lora.train_head and name.startswith(head))
                             or any(marker in name for marker in FEATURE_ADDED))
    return scaling


TRAINABLE_WARN_PERCENT = 50.0


def lora_warnings(report: ParameterReport, lora: TrainingLoRAConfig, from_scratch: bool,
                  tied: bool = False) -> list[str]:
    """The two LoRA misconfigurations the BEHRT troubleshooting guide describes, as loud messages.

    With `tied` embeddings the head is the token embedding, so either switch trains both.
    """
    warnings = []
    if report.trainable_percent > TRAINABLE_WARN_PERCENT:
        reason = ("training.lora.freeze_base is false, so every base weight trains too" if not lora.freeze_base
                  else "the trainable embeddings/head outweigh the rest of this model")
        warnings.append(
            f"{report.trainable_percent:.1f}% of the parameters are trainable under LoRA ({report.trainable:,} of "
            f"{report.total:,}; the adapters are {report.lora_percent:.2f}%): {reason}. This is full fine-tuning in "
            "disguise and overfits small datasets. Set training.lora.freeze_base: true and train only the adapters "
            "(plus train_embeddings/train_head when training from scratch); a LoRA run usually trains 2-10%")
    embeddings_on = lora.train_embeddings or (tied and lora.train_head)
    head_on = lora.train_head or (tied and lora.train_embeddings)
    frozen = [name for name, on in (("embeddings", embeddings_on), ("output head", head_on))
              if not on and lora.freeze_base]
    if from_scratch and frozen:
        keys = " and ".join(f"training.lora.train_{'embeddings' if n == 'embeddings' else 'head'}: true"
                            for n in frozen)
        warnings.append(
            f"the {' and '.join(frozen)} are frozen at their random initialisation while training from scratch "
            "(no training.init_from): the model cannot learn and the loss stays near ln(vocab_size). Set "
            f"{keys}, or start from pretrained weights with training.init_from")
    return warnings


def prepare_trainable(model: nn.Module, lora: TrainingLoRAConfig,
                      from_scratch: bool) -> tuple[float | None, ParameterReport, list[str]]:
    """Apply `training.lora` when enabled, then count: (alpha / r or None, the report, the warnings).

    The one path for a run and for a dry run (which passes a model built on
    the meta device, so a large model costs no memory).
    """
    scaling = apply_training_lora(model, lora) if lora.enabled else None
    report = parameter_report(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return scaling, report, lora_warnings(report, lora, from_scratch, tied) if lora.enabled else []

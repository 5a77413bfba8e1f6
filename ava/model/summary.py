"""Parameter accounting and FLOPs per token, computed from the built model itself.

Counting the modules rather than re-deriving formulas means the numbers
cannot drift from the code. The model is built on the `meta` device, so
summarising a 100B-parameter config allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ava.config.schema.model import ModelConfig
from ava.model.transformer import AvaForCausalLM


@dataclass
class ModelSummary:
    """Parameter counts and FLOPs per token of one model config."""

    total: int
    trainable: int
    active_per_token: int
    components: dict[str, int] = field(default_factory=dict)
    forward_flops_per_token: int = 0
    training_flops_per_token: int = 0
    sequence_length: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"total_parameters": self.total, "trainable_parameters": self.trainable,
                "active_parameters_per_token": self.active_per_token, "components": self.components,
                "sequence_length": self.sequence_length, "forward_flops_per_token": self.forward_flops_per_token,
                "training_flops_per_token": self.training_flops_per_token}


def _component(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "token embedding"
    if name.startswith("embed_positions"):
        return "position embedding"
    if name.startswith("lm_head"):
        return "output head"
    if ".attn." in name:
        return "attention"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.experts." in name:
        return "experts"
    if ".ffn.shared_expert." in name:
        return "shared expert"
    if ".ffn." in name:
        return "dense FFN"
    return "norms"


def summarise_model(model: AvaForCausalLM, sequence_length: int) -> ModelSummary:
    """Counts for `model`; FLOPs for a training sequence of `sequence_length` tokens.

    FLOPs follow the convention used for MFU (Chinchilla/PaLM): 2 per
    multiply-accumulate of every matmul a token passes through (the token
    embedding is a lookup, not a matmul), plus attention's QK^T and AV at
    2 * 2 * seq * (heads * head_dim) per layer, counting the full square as
    PaLM does although causal kernels skip half. Training = 3 x forward.
    """
    cfg = model.config
    components: dict[str, int] = {}
    total = trainable = 0
    for name, p in model.named_parameters():  # named_parameters skips the tied duplicate
        n = p.numel()
        components[_component(name)] = components.get(_component(name), 0) + n
        total += n
        trainable += n if p.requires_grad else 0
    inactive = 0
    for layer in model.moe_layers():  # each token uses k of the E experts of every MoE layer
        per_layer = sum(p.numel() for p in layer.experts.parameters())
        inactive += per_layer - per_layer * layer.top_k // layer.num_experts
    active = total - inactive
    lookup = components.get("token embedding", 0) + components.get("position embedding", 0)
    if cfg.tie_word_embeddings:
        lookup -= cfg.vocab_size * cfg.hidden_size  # the shared matrix is still a matmul in the output head
    matmul_params = active - lookup - components.get("norms", 0)
    attention = 2 * 2 * cfg.num_layers * sequence_length * cfg.num_attention_heads * cfg.head_dim
    forward = 2 * matmul_params + attention
    return ModelSummary(total=total, trainable=trainable, active_per_token=active, components=components,
                        forward_flops_per_token=forward, training_flops_per_token=3 * forward,
                        sequence_length=sequence_length)


def summarise_config(config: ModelConfig, sequence_length: int) -> ModelSummary:
    """Summary of a config without allocating its weights."""
    with torch.device("meta"):
        model = AvaForCausalLM(config)
    return summarise_model(model, sequence_length)


"""Parameter accounting and FLOPs per token, computed from the built model itself.

Counting the modules rather than re-deriving formulas means the numbers
cannot drift from the code. The model is built on the `meta` device, so
summarising a 100B-parameter config allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from ava.config.schema.model import ModelConfig
from ava.model.episodic_memory import EpisodicMemoryAttention
from ava.model.moa import MixtureOfAttention
from ava.model.moh import MixtureOfHeadsAttention
from ava.model.transformer import AvaForCausalLM

T = TypeVar("T", bound=nn.Module)


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
    features: dict[str, str] = field(default_factory=dict)  # enhanced feature -> what it costs or saves

    def as_dict(self) -> dict[str, object]:
        return {"total_parameters": self.total, "trainable_parameters": self.trainable,
                "active_parameters_per_token": self.active_per_token, "components": self.components,
                "sequence_length": self.sequence_length, "forward_flops_per_token": self.forward_flops_per_token,
                "training_flops_per_token": self.training_flops_per_token, "features": self.features}


def _component(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "token embedding"
    if name.startswith("embed_positions"):
        return "position embedding"
    if name.startswith("lm_head"):
        return "output head"
    if name.startswith("cross_blocks."):
        return "cross-attention"
    if ".attn.router." in name:
        return "attention router"
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
    for moa in _modules(model, MixtureOfAttention):  # and k of the E attention experts of every MoA layer
        per_layer = sum(p.numel() for p in (moa.q_proj, moa.o_proj, moa.q_bias, moa.o_bias) if p is not None)
        inactive += per_layer - per_layer * moa.top_k // moa.num_experts
    active = total - inactive
    lookup = components.get("token embedding", 0) + components.get("position embedding", 0)
    if cfg.tie_word_embeddings:
        lookup -= cfg.vocab_size * cfg.hidden_size  # the shared matrix is still a matmul in the output head
    matmul_params = active - lookup - components.get("norms", 0)
    attention, features = _attention_flops(model, sequence_length)
    forward = 2 * matmul_params + attention
    return ModelSummary(total=total, trainable=trainable, active_per_token=active, components=components,
                        forward_flops_per_token=forward, training_flops_per_token=3 * forward,
                        sequence_length=sequence_length, features=features)


def _modules(model: nn.Module, kind: type[T]) -> list[T]:
    return [m for m in model.modules() if isinstance(m, kind)]


def _attention_flops(model: AvaForCausalLM, seq: int) -> tuple[int, dict[str, str]]:
    """FLOPs per token of the score and value products (QK^T, AV) of every layer, and what the features cost.

    Counted as implemented: a standard or MoH layer scores every head against
    `seq` keys (MoH weights heads after computing them all); an MoA layer
    scores k * heads_per_expert query heads; the memory layer runs its local
    attention as one masked `seq` square and scores every earlier key of the
    row for the kNN lookup, then reads top_k values; a cross-attention block
    reads its chunk's neighbours (retrieval) or the whole context.
    """
    cfg = model.config
    per_head = 2 * 2 * seq * cfg.head_dim  # QK^T and AV, full square as PaLM counts it
    flops = 0
    features: dict[str, str] = {}
    for block in model.layers:
        attn = block.attn
        if isinstance(attn, MixtureOfAttention):
            flops += per_head * attn.top_k * attn.heads_per_expert
        elif isinstance(attn, EpisodicMemoryAttention):
            local = per_head * cfg.num_attention_heads  # one masked square: the kernel skips no segment
            lookup = 2 * seq * cfg.head_dim * cfg.num_attention_heads + 2 * attn.top_k * cfg.head_dim * cfg.num_attention_heads
            flops += local + lookup
        else:
            flops += per_head * cfg.num_attention_heads
    moh = _modules(model, MixtureOfHeadsAttention)
    if moh:
        share = moh[0].active_fraction
        features["moh"] = (f"{len(moh)} layer(s), {share:.0%} of heads active per token: a per-token sparse kernel "
                           f"would save {1 - share:.0%} of their attention FLOPs; this implementation computes every "
                           "head and weights the inactive ones 0, so they are counted in full")
    moa = _modules(model, MixtureOfAttention)
    if moa:
        features["moa"] = (f"{len(moa)} layer(s), {moa[0].top_k} of {moa[0].num_experts} attention experts per token, "
                           f"{moa[0].top_k * moa[0].heads_per_expert} query heads per token "
                           f"(standard attention: {cfg.num_attention_heads})")
    memory = _modules(model, EpisodicMemoryAttention)
    if memory:
        m = memory[0]
        features["episodic_memory"] = (f"layer {cfg.episodic_memory_layer}: local attention over segments of "
                                       f"{m.segment_length}, kNN top-{m.top_k} over up to {m.memory_size} earlier "
                                       "tokens of the same document")
    if model.cross_blocks:
        reads = (cfg.rag.num_neighbours * 2 * cfg.rag.chunk_size) if cfg.use_rag else seq
        flops += len(model.cross_blocks) * 2 * 2 * reads * cfg.hidden_size
        source = (f"{cfg.rag.num_neighbours} neighbours x {2 * cfg.rag.chunk_size} tokens per chunk"
                  if cfg.use_rag else f"a context of {seq} positions (assumed)")
        features["cross_attention"] = (f"{len(model.cross_blocks)} gated block(s) (every "
                                       f"{cfg.cross_attention.every_n_layers} layers), each token reading {source}")
    if cfg.use_rag:
        features["rag"] = (f"chunks of {cfg.rag.chunk_size} tokens, {cfg.rag.search} search; neighbours are "
                           "fetched on the host every step")
    return flops, features


def summarise_config(config: ModelConfig, sequence_length: int) -> ModelSummary:
    """Summary of a config without allocating its weights."""
    with torch.device("meta"):
        model = AvaForCausalLM(config)
    return summarise_model(model, sequence_length)


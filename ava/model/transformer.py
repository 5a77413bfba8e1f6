"""The decoder-only language model: embeddings, blocks, final norm, output head.

Plain PyTorch: no DeepSpeed, parallelism or precision policy in here. The
engine wraps it; `ava.model.zero3` marks its MoE layers for ZeRO-3. Every
attention layer, the gated cross-attention blocks between the blocks
included, is called one way (`ava.model.attention_interface`), with one
`AttentionInputs` built per forward from the `Context`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.model.attention_interface import AttentionInputs, AttentionLayer
from ava.model.attention_kinds import make_attention
from ava.model.block import TransformerBlock
from ava.model.compile import compile_blocks
from ava.model.generate import generate
from ava.model.kv_cache import KVCache
from ava.model.moe import MoELayer, MoEStats
from ava.model.moe.experts import GroupedExperts
from ava.model.norm import make_norm
from ava.model.rotary import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What a forward returns. `loss` is what to backpropagate: lm_loss + router_loss."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE FFN layer, in layer order
    attention_stats: list[MoEStats] = field(default_factory=list)  # one per routed (MoH/MoA) attention layer


@dataclass
class Context:
    """What a forward reads besides its tokens.

    - `states`: a context sequence for the cross-attention blocks, (batch, C,
      context_size) vectors (e.g. encoder states) or (batch, C) token ids,
      which the model embeds; `mask` (batch, C), True = valid.
    - `neighbours`: retrieved neighbours for RETRO's chunked cross-attention,
      (batch, seq // rag.chunk_size, K, length) token ids, -1 where missing.
    - `documents`: (batch, seq) document ids; the episodic memory never
      crosses from one document into another.
    """

    states: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    neighbours: torch.Tensor | None = None
    documents: torch.Tensor | None = None


def document_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token positions counted from each document's start, and the (batch, 1, seq, seq) attention mask.

    A document is a run of equal ids in a row of `segment_ids`; the mask lets a
    token see the earlier tokens of its own run only.
    """
    seq = segment_ids.shape[1]
    index = torch.arange(seq, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    same = first[:, :, None] == first[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    return index - first, (same & causal)[:, None]


class AvaForCausalLM(nn.Module):
    """GPT-style decoder; Llama/Mixtral- or GPT-2-shaped depending on the config."""

    def __init__(self, config: ModelConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position_embedding_type == "learned" else None)
        self.rotary = (RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
                       if config.position_embedding_type == "rope" else None)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        # Gated cross-attention before block i, keyed str(i) (ModuleDict keys are strings).
        self.cross_blocks = nn.ModuleDict({str(i): make_attention("cross", config, i)
                                           for i in config.cross_attention_layers})
        self.norm = make_norm(config.norm_type, config.hidden_size, config.layer_norm_eps, config.use_bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Compiled stand-ins for `layers` in the training forward (`use_compiled_blocks`); a plain list, so
        # they are not submodules and state dicts see only the eager model.
        self._compiled_layers: list | None = None
        self.reset_parameters()

    def use_compiled_blocks(self, backend: str = "inductor") -> None:
        """Run the blocks compiled with torch.compile in every forward without a KV cache (`ava.model.compile`)."""
        self._compiled_layers = compile_blocks(self.layers, backend)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms.

        Projections that write into the residual stream (attention output, FFN
        and expert down projections) are scaled by 1/sqrt(2 * num_layers), as in
        GPT-2 and Megatron, so the residual's variance does not grow with depth.
        """
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, residual_std if name.endswith(("o_proj", "down_proj")) else std)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)
            elif isinstance(module, GroupedExperts):
                for weight in (module.gate_proj, module.up_proj):
                    if weight is not None:
                        nn.init.normal_(weight, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, residual_std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, AttentionLayer):  # what only the kind knows: MoA's stacked projections, gates
                module.reset_parameters(std, residual_std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, segment_ids: torch.Tensor | None = None,
                context: Context | None = None) -> CausalLMOutput:
        """Logits for (batch, seq) `input_ids`; with `labels` (the same shape, -100 = ignore) also the loss.

        Labels are aligned with the inputs and shifted inside (position t predicts t+1),
        the Hugging Face convention, so `labels=input_ids` trains a language model.
        `segment_ids` (batch, seq) marks packed documents, `context` carries what the
        cross-attention blocks and the episodic memory read: see `hidden_states`.
        """
        hidden, stats, attention_stats = self.hidden_states(input_ids, cache, segment_ids, context)
        logits = self.lm_head(hidden)
        routed = [s.router_loss for s in (*stats, *attention_stats)]
        router_loss = torch.stack(routed).sum() if routed else None
        out = CausalLMOutput(logits=logits, router_loss=router_loss, moe_stats=stats,
                             attention_stats=attention_stats)
        if labels is not None:
            # The labels move left, not the logits: slicing (batch, seq, vocab) logits would copy them (and
            # their gradient, zero-filled) every step; the last position's label becomes "ignore".
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            out.lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=IGNORE_INDEX)
            out.loss = out.lm_loss + router_loss if router_loss is not None else out.lm_loss
        return out

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      segment_ids: torch.Tensor | None = None, context: Context | None = None
                      ) -> tuple[torch.Tensor, list[MoEStats], list[MoEStats]]:
        """The final normed hidden states (batch, seq, hidden), each MoE layer's and each routed attention's stats.

        What the output head reads; a value or reward head reads it too. With
        `segment_ids` (equal ids = one document, e.g. packed SFT examples) a
        token attends only to earlier tokens of its own document and positions
        restart at 0 in each, so a packed batch computes exactly what the
        documents would one by one.

        `context` (see `Context`): the plain context or the retrieved neighbours
        the cross-attention blocks read (without one they pass the stream through,
        which is what a zero gate computes anyway), and the document ids at which the
        episodic memory is cleared (default: `segment_ids`, else one document
        per row).
        """
        seq = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if past + seq > self.config.max_position_embeddings:
            raise UserError(
                f"a sequence of {past + seq} tokens is longer than model.max_position_embeddings = "
                f"{self.config.max_position_embeddings}, the longest the model accepts",
                f"truncate inputs to {self.config.max_position_embeddings} tokens (data.max_length), or raise "
                "model.max_position_embeddings before training (a trained model cannot be extended this way)")
        mask = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
            positions, mask = document_positions_and_mask(segment_ids)
        else:
            positions = torch.arange(past, past + seq, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        x = self.dropout(x)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        inputs = self._attention_inputs(context, segment_ids, x.dtype)
        stats: list[MoEStats] = []
        attention_stats: list[MoEStats] = []
        blocks = self._compiled_layers if self._compiled_layers is not None and cache is None else self.layers
        recompute = self.gradient_checkpointing and self.training and cache is None
        for i, block in enumerate(blocks):
            if str(i) in self.cross_blocks:
                x, _ = _call(self.cross_blocks[str(i)], recompute, x, rope, cache, i, mask, inputs)
            x, layer_stats, attn_stats = _call(block, recompute, x, rope, cache, i, mask, inputs)
            if layer_stats is not None:
                stats.append(layer_stats)
            if attn_stats is not None:
                attention_stats.append(attn_stats)
        if cache is not None:
            cache.advance(seq)
        return self.norm(x), stats, attention_stats

    def _attention_inputs(self, context: Context | None, segment_ids: torch.Tensor | None,
                          dtype: torch.dtype) -> AttentionInputs:
        """What the attention layers read besides x, once per forward: the document ids (the context's, else
        `segment_ids`), the cross-attention context embedded, and the model's rotary embedding."""
        documents = context.documents if context is not None and context.documents is not None else segment_ids
        inputs = AttentionInputs(documents=documents, rotary=self.rotary)
        if context is None or not self.cross_blocks:
            return inputs
        if context.neighbours is not None:
            ids = context.neighbours  # (batch, n_chunks, K, length), -1 = no neighbour there
            batch, chunks = ids.shape[:2]
            states = self.embed_tokens(ids.clamp_min(0)).to(dtype).reshape(batch, chunks, -1, self.config.hidden_size)
            return replace(inputs, states=states, states_mask=(ids >= 0).reshape(batch, chunks, -1),
                           chunk=self.config.rag.chunk_size)
        if context.states is None:
            return inputs
        states = context.states
        if not states.is_floating_point():  # token ids go through the model's own embedding
            states = self.embed_tokens(states)
        return replace(inputs, states=states.to(dtype), states_mask=context.mask)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache able to hold `max_length` positions."""
        param = self.embed_tokens.weight
        return KVCache(self.config.num_layers, batch, self.config.kv_heads, max_length, self.config.head_dim,
                       param.dtype, param.device)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """Continue `input_ids`; see `ava.model.generate.generate` for the sampling options."""
        return generate(self, input_ids, max_new_tokens, **sampling)


def _call(layer: Callable[..., Any], recompute: bool, *args: object) -> Any:
    """`layer(*args)`; with `recompute` (gradient checkpointing) its activations are recomputed in the backward."""
    return checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)

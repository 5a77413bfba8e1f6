"""The `model:` section: transformer and Mixture-of-Experts architecture."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import Section


class ModelConfig(Section):
    """Architecture of the decoder-only transformer; its FFN is an MoE when num_experts > 1."""

    hidden_size: int = Field(768, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(16, gt=0, description="Number of transformer blocks.")
    num_attention_heads: int = Field(12, gt=0, description="Attention heads; must divide hidden_size.")
    num_key_value_heads: int | None = Field(
        None, gt=0,
        description="Key/value heads for grouped-query attention; must divide num_attention_heads. "
        "null means num_attention_heads (plain multi-head attention).")
    intermediate_size: int = Field(3072, gt=0, description="Hidden width of each FFN (of each expert when MoE).")
    vocab_size: int = Field(65536, gt=0, description="Vocabulary size of the token embedding and output head.")
    max_position_embeddings: int = Field(2048, gt=0, description="Longest sequence the model accepts.")
    position_embedding_type: Literal["rope", "learned"] = Field(
        "rope", description="rope: rotary embeddings (Llama, Mixtral). learned: a position table (GPT-2).")
    rope_theta: float = Field(10000.0, gt=0, description="Base of the rotary frequencies.")
    norm_type: Literal["rmsnorm", "layernorm"] = Field(
        "rmsnorm", description="rmsnorm (Llama, Mixtral) or layernorm (GPT-2).")
    activation: Literal["swiglu", "gelu", "gelu_tanh"] = Field(
        "swiglu",
        description="FFN type. swiglu: gated SiLU with three matrices (Llama, Mixtral). gelu / gelu_tanh: "
        "two matrices with exact or tanh-approximated GELU (GPT-2 uses gelu_tanh).")
    use_bias: bool = Field(False, description="Biases on attention and FFN projections (GPT-2: true).")
    tie_word_embeddings: bool = Field(False, description="Share the token embedding with the output head.")

    num_experts: int = Field(16, ge=0, description="Experts per MoE layer; 0 or 1 means a dense (monolith) FFN.")
    num_experts_per_token: int = Field(2, gt=0, description="Experts each token is routed to (top-k).")
    expert_capacity_factor: float | None = Field(
        None, ge=0,
        description="Tokens an expert may take, as a multiple of the even share; over-capacity tokens "
        "skip the FFN through the residual. null or 0 means dropless (no token is dropped).")
    router_type: Literal["topk", "switch", "aux_loss_free"] = Field(
        "topk",
        description="topk: softmax over experts, top-k, renormalised (Mixtral). switch: top-1 (Switch "
        "Transformer). aux_loss_free: top-k with a per-expert bias balancing load (DeepSeek-V3).")
    router_aux_loss_coef: float = Field(0.01, ge=0, description="Weight of the load-balancing auxiliary loss.")
    router_z_loss_coef: float = Field(0.001, ge=0, description="Weight of the router z-loss (ST-MoE).")
    router_bias_update_rate: float = Field(
        0.001, ge=0,
        description="aux_loss_free only: how far each expert's routing bias moves per update towards "
        "even load (DeepSeek-V3's gamma).")
    shared_expert_intermediate_size: int = Field(
        0, ge=0,
        description="Width of an always-on shared expert added to every MoE layer (DeepSeek/Qwen-MoE "
        "style); 0 means none.")

    use_moh: bool = Field(False, description="Mixture-of-Head attention (not available yet).")
    use_moa: bool = Field(False, description="Mixture of Attention heads (not available yet).")
    use_rag: bool = Field(False, description="Retrieval augmentation (not available yet).")
    use_cross_attention: bool = Field(False, description="Gated cross-attention blocks (not available yet).")
    use_episodic_memory: bool = Field(False, description="Episodic kNN memory (not available yet).")

    layer_norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the normalisation layers.")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention probabilities.")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on residual-branch outputs.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_dropless(self) -> bool:
        return not self.expert_capacity_factor

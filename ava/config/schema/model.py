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
    intermediate_size: int = Field(3072, gt=0, description="Hidden width of each FFN (of each expert when MoE).")
    vocab_size: int = Field(65536, gt=0, description="Vocabulary size of the token embedding and output head.")
    max_position_embeddings: int = Field(2048, gt=0, description="Longest sequence the model accepts.")

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

"""The `model:` section: transformer and Mixture-of-Experts architecture."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import (
    COEF_MAX,
    EXPERTS_MAX,
    ITEMS_MAX,
    LAYERS_MAX,
    TOKENS_MAX,
    VOCAB_MAX,
    WIDTH_MAX,
    Section,
)

# RETRO retrieves 2 neighbours per chunk, each bringing 2 chunks into the batch: past 1,024 the retrieved
# context outgrows any sequence.
NEIGHBOURS_MAX = 1024
# The largest RoPE bases in use are about 1e8 (long-context Llama and Qwen variants); past 1e12 the slowest
# rotary frequencies no longer turn measurably over any context.
ROPE_THETA_MAX = 1e12


class MoHConfig(Section):
    """Mixture-of-Head attention: which heads a token uses, and how routing is balanced."""

    num_shared_heads: int | None = Field(
        None, ge=0, le=WIDTH_MAX, description="Heads every token uses (MoH's shared heads); the rest are routed. null = a "
        "quarter of num_attention_heads.")
    active_routed_heads: int | None = Field(
        None, gt=0, le=WIDTH_MAX, description="Routed heads each token activates (top-k over the routed heads); null = two "
        "thirds of the routed heads (with a quarter shared, 75% of all heads active, as in the MoH paper).")
    aux_loss_coef: float = Field(0.01, ge=0, le=COEF_MAX, description="Weight of the head load-balancing loss.")
    z_loss_coef: float = Field(0.0, ge=0, le=COEF_MAX, description="Weight of the head router's z-loss.")


class MoAConfig(Section):
    """Mixture of Attention heads: attention experts over shared keys and values."""

    num_experts: int = Field(8, gt=1, le=EXPERTS_MAX, description="Attention experts per MoA layer.")
    experts_per_token: int = Field(2, gt=0, le=EXPERTS_MAX, description="Attention experts each token is routed to (top-k).")
    heads_per_expert: int | None = Field(
        None, gt=0, le=WIDTH_MAX, description="Query heads of each expert, a multiple of the key/value heads (which all experts "
        "share); null = num_attention_heads / experts_per_token rounded to such a multiple, so a token uses about "
        "as many query heads as standard attention (with plain multi-head attention: num_attention_heads).")
    every_n_layers: int = Field(
        1, gt=0, le=LAYERS_MAX, description="MoA replaces the attention of every N-th layer (layers N-1, 2N-1, ...); with "
        "use_moh too, MoH takes the other layers.")
    aux_loss_coef: float = Field(0.01, ge=0, le=COEF_MAX, description="Weight of the attention-expert load-balancing loss.")
    z_loss_coef: float = Field(0.001, ge=0, le=COEF_MAX, description="Weight of the attention router's z-loss.")


class CrossAttentionConfig(Section):
    """Gated cross-attention blocks (tanh gates initialised at zero, as in Flamingo)."""

    every_n_layers: int = Field(
        4, gt=0, le=LAYERS_MAX, description="A gated cross-attention block before every N-th transformer block.")
    context_size: int | None = Field(
        None, gt=0, le=WIDTH_MAX, description="Width of the context vectors supplied with a batch; null = hidden_size "
        "(context given as token ids is embedded with the model's own token embedding).")
    num_heads: int | None = Field(None, gt=0, le=WIDTH_MAX, description="Cross-attention heads; null = num_attention_heads.")


class RAGConfig(Section):
    """RETRO-style retrieval augmentation: the datastore and how neighbours are fetched."""

    chunk_size: int = Field(64, gt=0, le=TOKENS_MAX, description="Tokens per retrieval chunk; must divide data.max_length.")
    num_neighbours: int = Field(
        2, gt=0, le=NEIGHBOURS_MAX, description="Neighbours retrieved per chunk (each chunk + continuation).")
    search: Literal["exact", "approximate"] = Field(
        "exact", description="exact: brute-force inner product. approximate: a faiss IVF index (needs faiss-cpu).")
    nlist: int = Field(1024, gt=0, le=ITEMS_MAX, description="approximate: IVF cells (clipped to the number of chunks).")
    nprobe: int = Field(16, gt=0, le=ITEMS_MAX, description="approximate: cells searched per query.")
    encoder: str = Field(
        "embedding", description="embedding: the model's own token embedding at initialisation, frozen; or "
        "the path of a local Hugging Face encoder directory (mean-pooled).")
    encoder_dim: int = Field(256, gt=0, le=WIDTH_MAX, description="embedding encoder: width the frozen table is projected to.")
    index_dir: str | None = Field(
        None, description="Where the datastore is; null = Ava's data cache, <cache>/rag/<fingerprint of the "
        "training rows>, so each dataset gets its own and a changed one a new one.")


class EpisodicMemoryConfig(Section):
    """Memorizing Transformers' kNN memory, attended by one layer."""

    layer: int | None = Field(
        None, ge=0, le=LAYERS_MAX - 1,
        description="Index of the layer with the memory; null = the layer at three quarters of depth.")
    segment_length: int = Field(
        64, gt=0, le=TOKENS_MAX, description="That layer attends locally within segments of this length and reaches earlier "
        "segments of the same document through the memory.")
    memory_size: int = Field(4096, gt=0, le=TOKENS_MAX, description="Most recent tokens kept in memory.")
    top_k: int = Field(32, gt=0, le=TOKENS_MAX, description="Memory entries each query retrieves.")


class ModelConfig(Section):
    """Architecture of the decoder-only transformer; its FFN is an MoE when num_experts > 1."""

    hidden_size: int = Field(768, gt=0, le=WIDTH_MAX, description="Width of the residual stream.")
    num_layers: int = Field(16, gt=0, le=LAYERS_MAX, description="Number of transformer blocks.")
    num_attention_heads: int = Field(12, gt=0, le=WIDTH_MAX, description="Attention heads; must divide hidden_size.")
    num_key_value_heads: int | None = Field(
        None, gt=0, le=WIDTH_MAX,
        description="Key/value heads for grouped-query attention; must divide num_attention_heads. "
        "null means num_attention_heads (plain multi-head attention).")
    intermediate_size: int = Field(3072, gt=0, le=WIDTH_MAX, description="Hidden width of each FFN (of each expert when MoE).")
    vocab_size: int = Field(65536, gt=0, le=VOCAB_MAX, description="Vocabulary size of the token embedding and output head.")
    max_position_embeddings: int = Field(2048, gt=0, le=TOKENS_MAX, description="Longest sequence the model accepts.")
    position_embedding_type: Literal["rope", "learned"] = Field(
        "rope", description="rope: rotary embeddings (Llama, Mixtral). learned: a position table (GPT-2).")
    rope_theta: float = Field(10000.0, gt=0, le=ROPE_THETA_MAX, description="Base of the rotary frequencies.")
    norm_type: Literal["rmsnorm", "layernorm"] = Field(
        "rmsnorm", description="rmsnorm (Llama, Mixtral) or layernorm (GPT-2).")
    activation: Literal["swiglu", "gelu", "gelu_tanh"] = Field(
        "swiglu",
        description="FFN type. swiglu: gated SiLU with three matrices (Llama, Mixtral). gelu / gelu_tanh: "
        "two matrices with exact or tanh-approximated GELU (GPT-2 uses gelu_tanh).")
    use_bias: bool = Field(False, description="Biases on attention and FFN projections (GPT-2: true).")
    tie_word_embeddings: bool = Field(False, description="Share the token embedding with the output head.")

    num_experts: int = Field(16, ge=0, le=EXPERTS_MAX, description="Experts per MoE layer; 0 or 1 means a dense (monolith) FFN.")
    num_experts_per_token: int = Field(2, gt=0, le=EXPERTS_MAX, description="Experts each token is routed to (top-k).")
    expert_capacity_factor: float | None = Field(
        None, ge=0, le=EXPERTS_MAX,
        description="Tokens an expert may take, as a multiple of the even share; over-capacity tokens "
        "skip the FFN through the residual. null or 0 means dropless (no token is dropped).")
    router_type: Literal["topk", "switch", "aux_loss_free"] = Field(
        "topk",
        description="topk: softmax over experts, top-k, renormalised (Mixtral). switch: top-1 (Switch "
        "Transformer). aux_loss_free: top-k with a per-expert bias balancing load (DeepSeek-V3).")
    router_aux_loss_coef: float = Field(0.01, ge=0, le=COEF_MAX, description="Weight of the load-balancing auxiliary loss.")
    router_z_loss_coef: float = Field(0.001, ge=0, le=COEF_MAX, description="Weight of the router z-loss (ST-MoE).")
    router_bias_update_rate: float = Field(
        0.001, ge=0, le=1,  # the bias shifts routing scores in [0, 1]: a step of 1 overrides any score
        description="aux_loss_free only: how far each expert's routing bias moves per update towards "
        "even load (DeepSeek-V3's gamma).")
    shared_expert_intermediate_size: int = Field(
        0, ge=0, le=WIDTH_MAX,
        description="Width of an always-on shared expert added to every MoE layer (DeepSeek/Qwen-MoE "
        "style); 0 means none.")

    use_moh: bool = Field(
        False, description="Mixture-of-Head attention (MoH, Jin et al. 2024): a router picks top-k routed "
        "heads per token beside always-on shared heads; settings under model.moh.")
    use_moa: bool = Field(
        False, description="Mixture of Attention heads (MoA, Zhang et al. 2022): attention experts with their "
        "own query/output projections over shared keys/values; settings under model.moa.")
    use_rag: bool = Field(
        False, description="RETRO-style retrieval: neighbours of each chunk from a datastore of the training "
        "corpus (`ava rag build-index`), read through the cross-attention blocks; settings under model.rag.")
    use_cross_attention: bool = Field(
        False, description="Gated cross-attention blocks (Flamingo) attending to a context supplied with the "
        "batch; settings under model.cross_attention.")
    use_episodic_memory: bool = Field(
        False, description="Episodic kNN memory (Memorizing Transformers) in one layer; settings under "
        "model.episodic_memory.")
    moh: MoHConfig = Field(default_factory=MoHConfig)
    moa: MoAConfig = Field(default_factory=MoAConfig)
    cross_attention: CrossAttentionConfig = Field(default_factory=CrossAttentionConfig)
    rag: RAGConfig = Field(default_factory=RAGConfig)
    episodic_memory: EpisodicMemoryConfig = Field(default_factory=EpisodicMemoryConfig)

    # An epsilon of 1 already outweighs the variance of unit-scale activations, and a std of 1 makes them grow
    # with depth from the first step (typical: 1e-6 to 1e-5, and 0.02).
    layer_norm_eps: float = Field(1e-5, gt=0, le=1, description="Epsilon of the normalisation layers.")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention probabilities.")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on residual-branch outputs.")
    initializer_range: float = Field(0.02, gt=0, le=1, description="Std of the normal weight initialisation.")

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

    @property
    def episodic_memory_layer(self) -> int:
        """The layer holding the episodic memory: configured, else three quarters of the way up."""
        layer = self.episodic_memory.layer
        return layer if layer is not None else (3 * self.num_layers) // 4

    @property
    def moh_shared_heads(self) -> int:
        shared = self.moh.num_shared_heads
        return shared if shared is not None else self.num_attention_heads // 4

    @property
    def moh_active_routed_heads(self) -> int:
        active = self.moh.active_routed_heads
        return active if active is not None else max(1, 2 * (self.num_attention_heads - self.moh_shared_heads) // 3)

    @property
    def moa_heads_per_expert(self) -> int:
        """Configured, else the multiple of the key/value heads nearest num_attention_heads / experts_per_token.

        MoA's experts share the keys and values, which are the model's key/value
        heads (the KV cache is the same in every layer); so each expert needs at
        least that many query heads.
        """
        if self.moa.heads_per_expert:
            return self.moa.heads_per_expert
        groups = max(1, self.num_attention_heads // self.kv_heads // self.moa.experts_per_token)
        return groups * self.kv_heads

    @property
    def cross_attention_layers(self) -> list[int]:
        """Blocks preceded by a gated cross-attention block: every N-th, from the first."""
        if not self.use_cross_attention:
            return []
        return list(range(0, self.num_layers, self.cross_attention.every_n_layers))

    def attention_kind(self, index: int) -> str:
        """"memory", "moa", "moh" or "standard": the attention of layer `index`.

        The memory layer is one designated layer; MoA takes every
        `moa.every_n_layers`-th layer (N-1, 2N-1, ...) of the rest; MoH takes
        the others; with none of them on, attention is standard.
        """
        if self.use_episodic_memory and index == self.episodic_memory_layer:
            return "memory"
        if self.use_moa and (index + 1) % self.moa.every_n_layers == 0:
            return "moa"
        if self.use_moh:
            return "moh"
        return "standard"

    @property
    def routes_attention(self) -> bool:
        """Whether some attention layer has a router (and so a router loss and statistics)."""
        return self.use_moh or self.use_moa

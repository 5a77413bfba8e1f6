"""Rules for the enhanced model features: MoH, MoA, cross-attention, retrieval, episodic memory.

Each rule names the key, says why the value cannot work and what to set
instead; none of them guesses a fix silently.
"""

from __future__ import annotations

from ava.config.check_context import CheckContext
from ava.config.errors import Notice
from ava.config.schema import DataConfig, ModelConfig


def check_features(ctx: CheckContext) -> None:
    m, data = ctx.sections["model"], ctx.sections["data"]
    assert isinstance(m, ModelConfig) and isinstance(data, DataConfig)
    if m.use_moh or m.use_moa or m.use_episodic_memory:
        _layers(ctx, m)
    if m.use_rag or m.use_episodic_memory:
        _documents(ctx, m, data)
    if m.use_moh:
        _moh(ctx, m)
    if m.use_moa:
        _moa(ctx, m)
    if m.use_cross_attention:
        _cross_attention(ctx, m)
    if m.use_rag:
        _rag(ctx, m, data)
    if m.use_episodic_memory:
        _memory(ctx, m, data)


def _documents(ctx: CheckContext, m: ModelConfig, data: DataConfig) -> None:
    """Token files carry no tokenizer, so their document boundaries are known only from data.eos_token_id."""
    if data.data_dir is None or data.eos_token_id is not None:
        return
    uses = [f for f, on in (("retrieval excludes only the query's own row", m.use_rag),
                            ("the episodic memory is cleared only between rows", m.use_episodic_memory)) if on]
    ctx.notices.append(Notice(
        "warning", ctx.where("data.data_dir"), ctx.key("data.data_dir"),
        f"token files in data.data_dir have no known end-of-document id, so every row counts as one document: "
        f"{' and '.join(uses)}. Set data.eos_token_id (GPT-2's is 50256) to find the real boundaries"))


def _layers(ctx: CheckContext, m: ModelConfig) -> None:
    """Every attention feature that is on must get at least one layer (the memory layer is taken first, then MoA's)."""
    kinds = [m.attention_kind(i) for i in range(m.num_layers)]
    for switch, kind, fix in (
            ("use_moh", "moh", "set model.moa.every_n_layers to 2 or more, so MoH takes the layers MoA leaves"),
            ("use_moa", "moa", "lower model.moa.every_n_layers, or move model.episodic_memory.layer")):
        if getattr(m, switch) and kind not in kinds:
            ctx.problem(f"model.{switch}", f"no layer would get {kind.upper()}: the layers are "
                        f"{', '.join(kinds)} (the episodic-memory layer first, then every "
                        f"moa.every_n_layers-th layer for MoA, the rest for MoH)", fix, True)


def _moh(ctx: CheckContext, m: ModelConfig) -> None:
    shared, active = m.moh_shared_heads, m.moh_active_routed_heads
    routed = m.num_attention_heads - shared
    if routed < 1:
        ctx.problem("model.moh.num_shared_heads",
                    f"leaves no head to route: model.num_attention_heads = {m.num_attention_heads} "
                    f"({ctx.where('model.num_attention_heads')})",
                    f"set num_shared_heads below {m.num_attention_heads} (the MoH paper shares about a quarter), "
                    "or null", shared)
    elif active > routed:
        ctx.problem("model.moh.active_routed_heads",
                    f"exceeds the {routed} routed heads (num_attention_heads {m.num_attention_heads} minus "
                    f"{shared} shared)", f"set active_routed_heads to at most {routed}, or null", active)


def _moa(ctx: CheckContext, m: ModelConfig) -> None:
    a = m.moa
    if a.experts_per_token > a.num_experts:
        ctx.problem("model.moa.experts_per_token",
                    f"a token cannot use more attention experts than exist: model.moa.num_experts = {a.num_experts}",
                    f"set experts_per_token <= {a.num_experts}", a.experts_per_token)
    if m.moa_heads_per_expert % m.kv_heads:
        ctx.problem("model.moa.heads_per_expert",
                    f"{m.moa_heads_per_expert} query heads per expert cannot share the {m.kv_heads} key/value heads "
                    "in equal groups",
                    f"use a multiple of {m.kv_heads} (or set model.num_key_value_heads to a divisor)",
                    m.moa_heads_per_expert)
    if a.every_n_layers > m.num_layers:
        ctx.problem("model.moa.every_n_layers",
                    f"no layer would get MoA: the model has {m.num_layers} layers",
                    f"set every_n_layers to at most {m.num_layers}", a.every_n_layers)


def _cross_attention(ctx: CheckContext, m: ModelConfig) -> None:
    c = m.cross_attention
    heads = c.num_heads or m.num_attention_heads
    if m.hidden_size % heads:
        ctx.problem("model.cross_attention.num_heads", f"must divide model.hidden_size = {m.hidden_size}",
                    "choose a divisor of hidden_size, or null for num_attention_heads", heads)
    if not m.use_rag:
        ctx.problem("model.use_cross_attention",
                    "the cross-attention blocks read a context supplied with each batch, and a training run's "
                    "batches carry one only from retrieval: without model.use_rag they would read nothing and "
                    "train nothing (through the Python API, pass `context=Context(states=...)` to the model)",
                    "set model.use_rag: true as well (retrieved neighbours become the context), or "
                    "use_cross_attention: false", True)


def _rag(ctx: CheckContext, m: ModelConfig, data: DataConfig) -> None:
    r = m.rag
    if not m.use_cross_attention:
        ctx.problem("model.use_rag",
                    "retrieved neighbours are read through the gated cross-attention blocks, and "
                    "model.use_cross_attention is false",
                    "set model.use_cross_attention: true (model.cross_attention.every_n_layers places them)", True)
    if m.cross_attention.context_size not in (None, m.hidden_size):
        ctx.problem("model.cross_attention.context_size",
                    f"retrieved neighbours are embedded with the model's own token embedding, {m.hidden_size} wide",
                    "set context_size: null", m.cross_attention.context_size)
    if r.chunk_size > data.max_length // 2:
        ctx.problem("model.rag.chunk_size",
                    f"a row of data.max_length = {data.max_length} tokens ({ctx.where('data.max_length')}) would "
                    "have fewer than two chunks: neighbours of chunk u are read by the tokens of chunk u+1, so "
                    "nothing in the row could read them",
                    f"use at most {data.max_length // 2}, e.g. {_divisor_near(data.max_length, data.max_length // 4)}",
                    r.chunk_size)
    elif data.max_length % r.chunk_size:
        ctx.problem("model.rag.chunk_size",
                    f"must divide data.max_length = {data.max_length} ({ctx.where('data.max_length')}): every "
                    "training row is cut into whole retrieval chunks",
                    f"use a divisor of {data.max_length}, e.g. {_divisor_near(data.max_length, r.chunk_size)}",
                    r.chunk_size)
    if r.encoder != "embedding" and (data.data_dir is not None or (not data.sources
                                                                 and data.builtin_dataset == "markov")):
        ctx.problem("model.rag.encoder", f"{r.encoder} encodes text, but this data is token ids with no tokenizer "
                    "to turn them back into text (token files or the Markov corpus)",
                    "use rag.encoder: embedding (the model's own token embedding)", r.encoder)
    if data.streaming and data.sources and data.data_dir is None:
        ctx.problem("model.use_rag", "the retrieval datastore is built from the training rows, and with "
                    "data.streaming: true data.sources are streamed, never held in memory",
                    "set data.streaming: false, or use_rag: false", True)


def _memory(ctx: CheckContext, m: ModelConfig, data: DataConfig) -> None:
    e = m.episodic_memory
    if e.layer is not None and e.layer >= m.num_layers:
        ctx.problem("model.episodic_memory.layer",
                    f"the model has layers 0..{m.num_layers - 1} (model.num_layers = {m.num_layers})",
                    f"choose a layer below {m.num_layers}, or null for three quarters of the way up", e.layer)
    if e.segment_length >= data.max_length:
        ctx.problem("model.episodic_memory.segment_length",
                    f"is not shorter than a training row (data.max_length = {data.max_length}, "
                    f"{ctx.where('data.max_length')}), so no earlier segment exists and the memory would never "
                    "hold anything", f"set segment_length below {data.max_length}, e.g. {data.max_length // 4}",
                    e.segment_length)


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - target))

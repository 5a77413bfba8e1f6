"""GPT-2 <-> Ava: every weight name, and the config.json an export writes.

GPT-2 stores its projections as `Conv1D` with (in, out) weights, the
transpose of `nn.Linear`, and q, k, v as one fused c_attn [q | k | v], which
is split into Ava's three projections here and joined on export. Checkpoints appear with and without the `transformer.` prefix
(the original OpenAI files lack it); both are read. Reading config.json into
Ava's model: section is `ava.config.hf_config.gpt2_config_from_hf`: config
loading needs it without torch, and this package imports config, not the reverse.
"""

from __future__ import annotations

import torch

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.hf.checkpoint import take


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    s = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    # Causal-mask buffers some versions saved; they are not weights.
    s = {k: v for k, v in s.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    out = {"embed_tokens.weight": take(s, "wte.weight", source),
           "embed_positions.weight": take(s, "wpe.weight", source),
           "norm.weight": take(s, "ln_f.weight", source), "norm.bias": take(s, "ln_f.bias", source)}
    if "lm_head.weight" in s:
        head = s.pop("lm_head.weight")
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = head
    elif not cfg.tie_word_embeddings:
        take(s, "lm_head.weight", source)
    for i in range(cfg.num_layers):
        hf, ava = f"h.{i}.", f"layers.{i}."
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[ava + f"{dst}.weight"] = take(s, hf + f"{src}.weight", source)
            out[ava + f"{dst}.bias"] = take(s, hf + f"{src}.bias", source)
        qkv_weight = take(s, hf + "attn.c_attn.weight", source).t().chunk(3)
        qkv_bias = take(s, hf + "attn.c_attn.bias", source).chunk(3)
        for p, weight, bias in zip("qkv", qkv_weight, qkv_bias, strict=True):
            out[ava + f"attn.{p}_proj.weight"], out[ava + f"attn.{p}_proj.bias"] = weight, bias
        for src, dst in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "ffn.up_proj"), ("mlp.c_proj", "ffn.down_proj")):
            out[ava + f"{dst}.weight"] = take(s, hf + f"{src}.weight", source).t()
            out[ava + f"{dst}.bias"] = take(s, hf + f"{src}.bias", source)
    if s:
        raise UserError(f"{source} has tensors Ava would ignore: {sorted(s)[:5]}",
                        "check that config.json belongs to these weights")
    return out


def export_blockers(cfg: ModelConfig) -> list[str]:
    blockers = []
    wanted = {"position_embedding_type": "learned", "norm_type": "layernorm", "use_bias": True}
    blockers += [f"{k} must be {v}" for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.activation not in ("gelu", "gelu_tanh"):
        blockers.append("activation must be gelu or gelu_tanh")
    if cfg.kv_heads != cfg.num_attention_heads:
        blockers.append("GPT-2 has no grouped-query attention (num_key_value_heads must be null)")
    if cfg.is_moe:
        blockers.append("GPT-2 is dense (num_experts must be 0 or 1)")
    return blockers


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads, "n_inner": cfg.intermediate_size,
        "n_positions": cfg.max_position_embeddings, "n_ctx": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "layer_norm_epsilon": cfg.layer_norm_eps,
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        "attn_pdrop": cfg.attention_dropout, "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.hidden_dropout,
        "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_attn_weights": True, "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["embed_tokens.weight"],
           "transformer.wpe.weight": state["embed_positions.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        hf, ava = f"transformer.h.{i}.", f"layers.{i}."
        for dst, src in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[hf + f"{dst}.weight"], out[hf + f"{dst}.bias"] = state[ava + f"{src}.weight"], state[ava + f"{src}.bias"]
        out[hf + "attn.c_attn.weight"] = torch.cat([state[ava + f"attn.{p}_proj.weight"] for p in "qkv"]).t()
        out[hf + "attn.c_attn.bias"] = torch.cat([state[ava + f"attn.{p}_proj.bias"] for p in "qkv"])
        for dst, src in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "ffn.up_proj"), ("mlp.c_proj", "ffn.down_proj")):
            out[hf + f"{dst}.weight"] = state[ava + f"{src}.weight"].t()
            out[hf + f"{dst}.bias"] = state[ava + f"{src}.bias"]
    return out

"""Llama (dense) and Mixtral (MoE) <-> Ava: every weight name, and the config.json an export writes.

Ava's names follow Llama's except for the stacked (E, in, out) expert
tensors, which are split and joined here. Mixtral experts are read from the hub layout (`experts.{e}.w1/w2/w3`,
which transformers 5 still writes by default) or the fused one
(`mlp.experts.gate_up_proj`, written with save_original_format=False).
Reading config.json into Ava's model: section is
`ava.config.hf_config.llama_config_from_hf`: config loading needs it without
torch, and this package imports config, not the reverse.
"""

from __future__ import annotations

import torch

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.hf.checkpoint import take

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Ava state dict from Llama/Mixtral tensors; every tensor of the file must be used."""
    s = dict(hf_state)
    out = {"embed_tokens.weight": take(s, "model.embed_tokens.weight", source),
           "norm.weight": take(s, "model.norm.weight", source)}
    if "lm_head.weight" in s:
        out["lm_head.weight"] = s.pop("lm_head.weight")
    elif not cfg.tie_word_embeddings:
        take(s, "lm_head.weight", source)
    for i in range(cfg.num_layers):
        hf, ava = f"model.layers.{i}.", f"layers.{i}."
        out[ava + "attn_norm.weight"] = take(s, hf + "input_layernorm.weight", source)
        out[ava + "ffn_norm.weight"] = take(s, hf + "post_attention_layernorm.weight", source)
        for kind in (["weight", "bias"] if cfg.use_bias else ["weight"]):
            for p in "qkvo":
                out[ava + f"attn.{p}_proj.{kind}"] = take(s, hf + f"self_attn.{p}_proj.{kind}", source)
        if cfg.is_moe:
            out.update(_experts_from_hf(s, hf, ava, cfg.num_experts, source))
        else:
            for kind in (["weight", "bias"] if cfg.use_bias else ["weight"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    out[ava + f"ffn.{proj}.{kind}"] = take(s, hf + f"mlp.{proj}.{kind}", source)
    leftover = [k for k in s if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise UserError(f"{source} has tensors Ava would ignore: {leftover[:5]}; converting would "
                        "silently change the model", "check that config.json belongs to these weights")
    return out


def _experts_from_hf(s: dict[str, torch.Tensor], hf: str, ava: str, num_experts: int,
                     source: str) -> dict[str, torch.Tensor]:
    out = {}
    if hf + "mlp.experts.gate_up_proj" in s:  # fused layout: (E, 2I, H) and (E, H, I)
        out[ava + "ffn.router.gate.weight"] = take(s, hf + "mlp.gate.weight", source)
        gate, up = take(s, hf + "mlp.experts.gate_up_proj", source).transpose(1, 2).chunk(2, dim=2)
        out[ava + "ffn.experts.gate_proj"], out[ava + "ffn.experts.up_proj"] = gate.contiguous(), up.contiguous()
        out[ava + "ffn.experts.down_proj"] = take(s, hf + "mlp.experts.down_proj", source).transpose(1, 2)
        return out
    moe = hf + "block_sparse_moe."
    out[ava + "ffn.router.gate.weight"] = take(s, moe + "gate.weight", source)
    for ava_name, hf_name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        out[ava + f"ffn.experts.{ava_name}"] = torch.stack(
            [take(s, moe + f"experts.{e}.{hf_name}.weight", source).t() for e in range(num_experts)])
    return out


def export_blockers(cfg: ModelConfig) -> list[str]:
    """Why this Ava config has no exact Llama/Mixtral equivalent (empty when it has one)."""
    blockers = []
    if cfg.position_embedding_type != "rope":
        blockers.append("position_embedding_type must be rope")
    if cfg.norm_type != "rmsnorm":
        blockers.append("norm_type must be rmsnorm")
    if cfg.activation != "swiglu":
        blockers.append("activation must be swiglu")
    if cfg.is_moe:
        if cfg.router_type != "topk":
            blockers.append(f"router_type {cfg.router_type} has no Mixtral equivalent (Mixtral is topk)")
        if cfg.shared_expert_intermediate_size:
            blockers.append("Mixtral has no shared expert (shared_expert_intermediate_size must be 0)")
        if cfg.use_bias:
            blockers.append("Mixtral has no biases (use_bias must be false)")
    return blockers


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    kind = "mixtral" if cfg.is_moe else "llama"
    hf = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.layer_norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.initializer_range, "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if kind == "llama":
        hf.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    else:
        hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_token,
                  router_aux_loss_coef=cfg.router_aux_loss_coef, sliding_window=None, output_router_logits=False)
    return hf


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hub-layout tensors (the layout every transformers version loads) from an Ava state dict."""
    out = {"model.embed_tokens.weight": state["embed_tokens.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        hf, ava = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = state[ava + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ava + "ffn_norm.weight"]
        for kind in (["weight", "bias"] if cfg.use_bias else ["weight"]):
            for p in "qkvo":
                out[hf + f"self_attn.{p}_proj.{kind}"] = state[ava + f"attn.{p}_proj.{kind}"]
        if cfg.is_moe:
            moe = hf + "block_sparse_moe."
            out[moe + "gate.weight"] = state[ava + "ffn.router.gate.weight"]
            for ava_name, hf_name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                stacked = state[ava + f"ffn.experts.{ava_name}"]
                for e in range(cfg.num_experts):
                    out[moe + f"experts.{e}.{hf_name}.weight"] = stacked[e].t()
        else:
            for kind in (["weight", "bias"] if cfg.use_bias else ["weight"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    out[hf + f"mlp.{proj}.{kind}"] = state[ava + f"ffn.{proj}.{kind}"]
    return out

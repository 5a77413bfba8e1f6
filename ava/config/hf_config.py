"""A Hugging Face `config.json` (GPT-2, Llama, Mixtral) as Ava's model: section.

Mapping the config keys is configuration work: a dict in, a `ModelConfig`
out, no weights and no torch. Config loading needs it to adopt a
`training.init_from` checkpoint's architecture (`ava.config.pretrained`), so
it lives in the config package; `ava.hf`, which converts the weights and sits
above both config and model, imports it from here. Every refusal names the
config.json key whose value Ava cannot reproduce exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ava.config.schema.model import ModelConfig
from ava.errors import UserError

GPT2_ACTIVATIONS: dict[str, Literal["gelu", "gelu_tanh"]] = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def read_hf_config(directory: Path) -> dict:
    """The JSON object in `directory/config.json`."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory", "pass the folder that holds config.json "
                        "and the *.safetensors files of the Hugging Face model")
    if not path.is_file():
        raise UserError(f"{path} not found: {directory} is not a Hugging Face model directory",
                        "pass the folder that holds config.json (a local copy; Ava does not download)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})",
                        "repair or re-download config.json") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not a JSON object", "repair config.json")
    return config


def gpt2_config_from_hf(hf: dict) -> ModelConfig:
    """Ava's model config for a GPT-2 config.json."""
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise UserError(f"config.json uses activation_function `{act}`, which Ava's GPT-2 import does not "
                        f"support", f"use one of {', '.join(GPT2_ACTIVATIONS)}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UserError(f"config.json sets {flag}, which changes attention in a way Ava does not "
                            "implement", f"use a checkpoint with {flag} false")
    if hf.get("scale_attn_weights") is False:
        raise UserError("config.json sets scale_attn_weights false (unscaled attention)",
                        "use a checkpoint with scaled attention")
    hidden = hf["n_embd"]
    return ModelConfig(
        hidden_size=hidden, num_layers=hf["n_layer"], num_attention_heads=hf["n_head"], num_key_value_heads=None,
        intermediate_size=hf.get("n_inner") or 4 * hidden, vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["n_positions"], position_embedding_type="learned", norm_type="layernorm",
        activation=GPT2_ACTIVATIONS[act], use_bias=True, tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), attention_dropout=hf.get("attn_pdrop", 0.1),
        hidden_dropout=hf.get("resid_pdrop", 0.1), initializer_range=hf.get("initializer_range", 0.02),
        num_experts=0, num_experts_per_token=1,
    )


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(f"config.json uses rope scaling `{kind}`, which Ava does not implement; "
                        "its logits would differ from the original", "use a checkpoint without rope scaling")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_config_from_hf(hf: dict) -> ModelConfig:
    """Ava's model config for a Llama or Mixtral config.json."""
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise UserError(f"config.json sets head_dim = {hf['head_dim']}, but Ava's heads have "
                        f"hidden_size / num_attention_heads = {hidden // heads} dimensions",
                        "use a checkpoint whose head_dim is hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json uses hidden_act `{hf['hidden_act']}`; Ava's SwiGLU uses silu",
                        "use a checkpoint with hidden_act silu")
    if hf.get("attention_bias") != hf.get("mlp_bias", hf.get("attention_bias")):
        raise UserError("config.json sets attention_bias and mlp_bias differently; Ava has one use_bias",
                        "use a checkpoint where both are equal")
    window = hf.get("sliding_window")
    if window is not None and window < hf["max_position_embeddings"]:
        raise UserError(f"config.json uses sliding-window attention ({window} tokens), which Ava does "
                        "not implement", "use a checkpoint with sliding_window null")
    moe = hf.get("model_type") == "mixtral"
    return ModelConfig(
        hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
        position_embedding_type="rope", rope_theta=_rope_theta(hf), norm_type="rmsnorm", activation="swiglu",
        use_bias=bool(hf.get("attention_bias", False)), tie_word_embeddings=bool(hf.get("tie_word_embeddings")),
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6), attention_dropout=float(hf.get("attention_dropout", 0.0)),
        hidden_dropout=0.0, initializer_range=hf.get("initializer_range", 0.02),
        num_experts=hf.get("num_local_experts", 0) if moe else 0,
        num_experts_per_token=hf.get("num_experts_per_tok", 2) if moe else 1,
        expert_capacity_factor=None, router_type="topk",
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.01) if moe else 0.01,
        router_z_loss_coef=0.0 if moe else 0.001,
    )


# config.json's model_type -> its mapping; the families Ava converts (ava.hf maps their weights).
CONFIG_MAPPINGS: dict[str, Callable[[dict], ModelConfig]] = {
    "llama": llama_config_from_hf, "mixtral": llama_config_from_hf, "gpt2": gpt2_config_from_hf}


def hf_family(hf_config: dict, source: Path) -> str:
    """config.json's model_type, when it is a family Ava converts."""
    model_type = str(hf_config.get("model_type"))
    if model_type not in CONFIG_MAPPINGS:
        raise UserError(f"{source / 'config.json'} has model_type `{model_type}`; Ava converts "
                        f"{', '.join(sorted(CONFIG_MAPPINGS))}", "convert a model of one of those families")
    return model_type


def model_config_from_hf(directory: str | Path) -> ModelConfig:
    """The Ava model config equivalent to a local Hugging Face checkpoint's config.json (no weights read)."""
    source = Path(directory)
    hf_config = read_hf_config(source)
    mapping = CONFIG_MAPPINGS[hf_family(hf_config, source)]
    try:
        return mapping(hf_config)
    except KeyError as exc:
        raise UserError(f"{source / 'config.json'} lacks `{exc.args[0]}`", "repair config.json") from exc

"""The Ava model: a pure-PyTorch decoder-only transformer with optional Mixture-of-Experts FFNs."""

from ava.model.errors import ModelInputError
from ava.model.transformer import AvaForCausalLM, CausalLMOutput

__all__ = ["AvaForCausalLM", "CausalLMOutput", "ModelInputError"]

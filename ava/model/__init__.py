"""The Ava model: a pure-PyTorch decoder-only transformer with optional Mixture-of-Experts FFNs.

The model classes are imported on first use, so that importing a light
submodule (the summary's arithmetic, say) does not pay for importing torch:
`ava config validate` then starts in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ava.model.transformer import AvaForCausalLM, CausalLMOutput

__all__ = ["AvaForCausalLM", "CausalLMOutput"]


def __getattr__(name: str) -> Any:
    if name in ("AvaForCausalLM", "CausalLMOutput"):
        from ava.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'ava.model' has no attribute {name!r}")

"""The `model.rag` settings a datastore is built with, and where a store lives by default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RagSettings:
    chunk_size: int = 64
    num_neighbours: int = 2
    search: str = "exact"  # or "approximate" (faiss IVF-Flat)
    nlist: int = 1024
    nprobe: int = 16
    encoder: str = "embedding"  # or a local Hugging Face encoder directory
    encoder_dim: int = 256
    index_dir: str | None = None

    @classmethod
    def from_section(cls, section: Any | None) -> RagSettings:
        """From a `rag:` section (an object with these attributes, or a mapping); absent keys keep the defaults."""
        if section is None:
            return cls()
        values: dict[str, Any] = {}
        for field in fields(cls):
            value = section.get(field.name) if isinstance(section, Mapping) else getattr(section, field.name, None)
            if value is not None:
                values[field.name] = str(value) if field.name == "index_dir" else value
        return cls(**values)

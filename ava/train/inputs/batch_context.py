"""What a training or evaluation batch carries besides its tokens (`ava.model.transformer.Context`).

- Retrieval (`model.use_rag`): each chunk's neighbours from the datastore,
  the query's own document excluded during training (RETRO).
- Episodic memory (`model.use_episodic_memory`): document ids, so the
  memory is cleared where a packed row passes from one document to the next.

Built on the host from the host batch, before it moves to the device: the
datastore lives in host memory, and the document ids come from the tokens.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ava.model.penalties import segments_from_eos
from ava.model.transformer import Context


class NeighbourSource(Protocol):
    def neighbours(self, tokens: torch.Tensor, k: int, exclude_own_document: bool = True) -> torch.Tensor: ...


def documents_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, seq) document ids: a new document starts after each end-of-document token (which ends its own)."""
    return segments_from_eos(tokens, eos_id)[0]


class BatchContext:
    """Turns a (batch, seq) host tensor of token ids into the model's `Context`, or None when nothing is needed."""

    def __init__(self, retriever: NeighbourSource | None, num_neighbours: int, eos_id: int | None,
                 memory: bool) -> None:
        self.retriever, self.num_neighbours = retriever, num_neighbours
        self.eos_id, self.memory = eos_id, memory

    @property
    def needed(self) -> bool:
        return self.retriever is not None or (self.memory and self.eos_id is not None)

    def __call__(self, tokens: torch.Tensor, device: torch.device) -> Context | None:
        """The context for `tokens`, on `device`.

        Neighbours from a query chunk's own document are excluded for held-out
        batches too: such a chunk is in the store only if the held-out text
        repeats the training text, and retrieving the copy would leak it.
        """
        if not self.needed:
            return None
        context = Context()
        if self.retriever is not None:
            found = self.retriever.neighbours(tokens.cpu(), self.num_neighbours)
            context.neighbours = found.to(device, non_blocking=True)
        if self.memory and self.eos_id is not None:
            context.documents = documents_from_eos(tokens, self.eos_id).to(device, non_blocking=True)
        return context

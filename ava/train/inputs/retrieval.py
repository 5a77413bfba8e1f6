"""Opening (and on first use building) the retrieval store for a training run.

The store's chunk vectors come from the model's own token embedding at the
start of the run (`rag.encoder: embedding`), so the store is found, or
built, once the model is built and its initial weights are set: the
embedding then exists, no second copy of the model is made, and the store's
encoder fingerprint can be checked against it. Rank 0 builds; the others wait
for its verdict (a broadcast, so a failed build stops every rank) and open what
it wrote. A build longer than the process group's timeout would time the
others out: build a large corpus's store ahead of time with `ava rag build-index`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.rag.chunks import data_fingerprint
from ava.rag.retriever import Retriever
from ava.rag.run_store import make_encoder, store_dir
from ava.rag.store import build_store
from ava.train.inputs.batch_context import BatchContext


@dataclass
class RetrievalPlan:
    """What a run needs to give its batches their context; `open` turns it into a `BatchContext`."""

    model: ModelConfig
    rows: np.ndarray | None  # packed training rows (None: no retrieval)
    eos_id: int | None
    cache_dir: str | None
    decode: Callable[[list[int]], str] | None = None
    # training.init_from's token embedding: what the run started from, also when it resumes from a checkpoint.
    pretrained_embedding: Callable[[], torch.Tensor] | None = None

    def open(self, embedding: torch.Tensor, rank: int, world_size: int,
             on_note: Callable[[str], None] | None = None) -> BatchContext:
        """`embedding`: the model's token embedding as built (seeded); replaced by init_from's where there is one."""
        if self.pretrained_embedding is not None and self.model.use_rag:
            embedding = self.pretrained_embedding()
        retriever = self._retriever(embedding, rank, world_size, on_note) if self.model.use_rag else None
        return BatchContext(retriever, self.model.rag.num_neighbours, self.eos_id, self.model.use_episodic_memory)

    def _retriever(self, embedding: torch.Tensor, rank: int, world_size: int,
                   on_note: Callable[[str], None] | None) -> Retriever:
        assert self.rows is not None
        rag = self.model.rag
        encoder = make_encoder(rag, embedding, self.decode)
        directory = store_dir(rag.index_dir, self.cache_dir, self.rows, encoder)
        failure: BaseException | None = None
        if rank == 0 and not (directory / "manifest.json").is_file():
            try:
                info = build_store(self.rows, self.eos_id, encoder, directory, rag.chunk_size, rag.search, rag.nlist)
                if on_note is not None:
                    on_note(f"retrieval: built the datastore on first use, {info.describe()}")
            except Exception as exc:  # told to the other ranks below, so that they stop instead of waiting
                failure = exc
        if world_size > 1:  # the others wait for rank 0's verdict, not at a bare barrier
            verdict = [str(failure) if failure is not None else ""]
            torch.distributed.broadcast_object_list(verdict, src=0)
            if verdict[0] and failure is None:
                raise UserError(f"rank 0 could not build the retrieval store in {directory}: {verdict[0]}",
                                "see rank 0's message above; building it ahead of time with `ava rag "
                                "build-index` and the same config shows the problem on its own")
        if failure is not None:
            raise failure
        if not (directory / "manifest.json").is_file():
            raise UserError(f"the retrieval store rank 0 built in {directory} is not visible on this node",
                            "put data.cache_dir (or model.rag.index_dir) on a filesystem every node shares, "
                            "or run `ava rag build-index` with the same config on every node first")
        retriever = Retriever.open(directory, decode=self.decode, nprobe=rag.nprobe)
        retriever.check(chunk_size=rag.chunk_size, data_fingerprint=data_fingerprint(self.rows),
                        encoder_fingerprint=encoder.fingerprint)
        if on_note is not None:
            on_note(f"retrieval: {retriever.num_chunks:,} chunks of {rag.chunk_size} tokens in {directory}, "
                    f"{rag.num_neighbours} neighbours per chunk, {rag.search} search")
        return retriever

"""Training batches from a stream of documents: tokenised and packed on the fly, sharded, resumable exactly.

A stream has no length known in advance, so it has no fixed number of
batches per epoch; the run's length comes from `training.max_steps`.  An
epoch is one pass over the stream; the tokens left at its end that do not fill
a micro-batch are dropped, and the next epoch starts with an empty buffer.

Resuming is exact, and simple rather than instant: the position is (epoch,
document, offset) — the next row starts `offset` tokens into the `document`-th
document of this rank's stream in that epoch.  A resumed run rebuilds the
epoch's stream from the seed, reads (without tokenising) the documents before
that one, and continues; so it yields exactly the batches the uninterrupted
run would have, at the cost of re-reading what the epoch had consumed.
(`datasets`' own `state_dict` is not used: it drops the shuffle buffer's
contents, so its resume is approximate.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import torch

from ava.data.packing import Position, pack_stream
from ava.data.prefetch import prefetch
from ava.data.tokenizer import Tokenizer, encode_many
from ava.errors import UserError

if TYPE_CHECKING:
    from datasets import IterableDataset

EpochDocuments = Callable[[int], Iterable[str | None]]
"""epoch -> this rank's documents in that epoch; the same sequence every time it is called with that epoch."""


def rank_documents(dataset: IterableDataset, seed: int, buffer_size: int, rank: int, world_size: int,
                   reshuffle_each_epoch: bool, max_documents: int | None = None) -> EpochDocuments:
    """This rank's share of `dataset` ("text" column), shuffled with `seed` and a `buffer_size` buffer.

    Every rank shuffles with the same seed, so `split_dataset_by_node` gives
    them disjoint shares (whole files when their number divides the world size,
    else every world_size-th document).  With `reshuffle_each_epoch` the shuffle
    of epoch e uses seed + e (`set_epoch`), otherwise every epoch is the same.
    `max_documents` caps the documents of an epoch, over all ranks together.
    """
    from datasets.distributed import split_dataset_by_node

    shuffled = dataset.shuffle(seed=seed, buffer_size=buffer_size)
    if max_documents is not None:
        shuffled = shuffled.take(max_documents)  # after the shuffle, so that the files' order is still shuffled
    share = split_dataset_by_node(shuffled, rank=rank, world_size=world_size)

    def documents(epoch: int) -> Iterator[str | None]:
        share.set_epoch(epoch if reshuffle_each_epoch else 0)
        for batch in share.iter(batch_size=256):
            yield from batch["text"]

    return documents


class StreamingBatches:
    """Micro-batches of shape (micro_batch, max_length), packed on the fly from `documents(epoch)`, for one rank.

    The same interface as `SequenceBatches`: iterating yields the batches left in
    the current epoch, then moves on to the next; `state_dict()` taken after any
    batch, loaded into a fresh instance, continues with exactly the batch the
    uninterrupted iteration would have yielded next.

    `prefetch_depth` > 0 prepares that many batches ahead in a background thread
    (`ava.data.prefetch`); `pin_memory` pins each batch (for CUDA copies).
    """

    def __init__(self, documents: EpochDocuments, tokenizer: Tokenizer, max_length: int, micro_batch: int,
                 nominal_batches_per_epoch: int, prefetch_depth: int = 0, pin_memory: bool = False) -> None:
        if micro_batch < 1 or max_length < 1 or nominal_batches_per_epoch < 1 or prefetch_depth < 0:
            raise UserError(
                f"invalid streaming batches: micro_batch = {micro_batch}, max_length = {max_length}, "
                f"batches_per_epoch = {nominal_batches_per_epoch}, prefetch_depth = {prefetch_depth}",
                "use micro_batch, max_length and batches_per_epoch >= 1 and prefetch_depth >= 0")
        self._documents = documents
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._micro_batch = micro_batch
        self._nominal = nominal_batches_per_epoch
        self._prefetch_depth = prefetch_depth
        self._pin_memory = pin_memory
        self._epoch = 0
        self._position: Position = (0, 0)

    @property
    def batches_per_epoch(self) -> int:
        """Nominal: a stream's epoch length is unknown, so this is the micro-batches this rank takes in the run.

        It is what the builder was told the run needs; a loop that does
        something "every epoch" then does it once, at the end.  Iteration itself
        ignores it and runs to the end of the stream.
        """
        return self._nominal

    def state_dict(self) -> dict[str, int]:
        """Position in the data: the epoch, and the document and token offset the next row starts at."""
        document, offset = self._position
        return {"epoch": self._epoch, "document": document, "offset": offset}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position taken by `state_dict()` (same data, tokenizer, seed and number of ranks)."""
        values = [state.get(name) for name in ("epoch", "document", "offset")]
        if not all(isinstance(v, int) and v >= 0 for v in values):
            raise UserError(
                f"data position {dict(state)} is not a streaming position (epoch, document, offset)",
                "resume with the data settings the checkpoint was written with (data.streaming and data.sources)")
        epoch, document, offset = (int(v) for v in values if v is not None)
        self._epoch, self._position = epoch, (document, offset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, start = self._epoch, self._position
        produced = self._batches(epoch, start)
        if self._prefetch_depth:
            produced = prefetch(produced, self._prefetch_depth)
        yielded = False
        try:
            for batch, position in produced:
                # Record the position before handing the batch out: a state_dict taken while the
                # caller holds this batch must resume with the next one.
                self._position = position
                yielded = True
                yield batch
        finally:
            close = getattr(produced, "close", None)
            if close is not None:
                close()
        if not yielded and start == (0, 0):
            raise UserError(
                f"epoch {epoch} of the stream gave this rank no full micro-batch "
                f"({self._micro_batch} x {self._max_length} tokens)",
                "use more data (or a larger data.max_samples), a smaller data.max_length or training.batch_size, "
                "or fewer ranks")
        self._epoch, self._position = epoch + 1, (0, 0)

    def _batches(self, epoch: int, start: Position) -> Iterator[tuple[torch.Tensor, Position]]:
        rows = pack_stream(self._documents(epoch), partial(encode_many, self._tokenizer), self._max_length,
                           self._tokenizer.eos_id, start)
        while True:
            group = list(islice(rows, self._micro_batch))
            if len(group) < self._micro_batch:
                return  # the end of the epoch's stream: a partial micro-batch is dropped
            batch = torch.from_numpy(np.stack([row for row, _ in group]))
            if self._pin_memory:
                batch = batch.pin_memory()
            yield batch, group[-1][1]

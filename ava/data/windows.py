"""Random windows: micro-batches of `max_length` tokens cut at random offsets of a token stream (nanoGPT style).

`data.sampling: random_windows` trains on windows drawn anywhere in the flat
training stream (a `train.bin`, or the packed corpus's rows joined back into
one stream), instead of visiting fixed packed rows: across epochs the model
sees every token in many contexts, not always at the same position of the
same row. A window is exactly the shape of a packed row, `max_length` tokens:
the model shifts the labels itself (`labels=input_ids`), so a window of L
tokens is L - 1 next-token predictions, as a row is.

The offsets of micro-batch i of epoch e are a pure function of (seed, e, i):
every rank draws the same `micro_batch * world_size` distinct offsets and
takes its own slice of them, so the ranks' windows differ (no two windows of
one global batch start at the same token; random windows may still overlap,
as they do in nanoGPT) and a global batch is the same on any number of ranks
with the same global batch. An epoch is as many windows as the stream holds
tokens, `tokens // (max_length * micro_batch * world_size)` micro-batches per
rank, which is where `eval_strategy: epoch` evaluates. Resuming is exact:
the position is (epoch, micro-batches yielded), and the next batch is
recomputed from it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from ava.errors import UserError


class RandomWindows:
    """Iterate micro-batches of shape (micro_batch, length) cut at seeded random offsets of `tokens`, for one rank.

    The same interface as `SequenceBatches`: iterating yields the batches left
    in the current epoch, then moves on to the next; `state_dict()` taken after
    any batch, loaded into a fresh instance, continues with exactly the batch
    the uninterrupted iteration would have yielded next. `tokens` may be a
    memory-mapped token file: only the windows drawn are read.
    """

    def __init__(self, tokens: np.ndarray, length: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 reshuffle_each_epoch: bool, pin_memory: bool = False) -> None:
        if tokens.ndim != 1:
            raise UserError(f"random windows need a flat token stream, got shape {tuple(tokens.shape)}",
                            "pass the training tokens as one 1-D array")
        if length < 1 or micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise UserError(
                f"invalid random windows: length = {length}, micro_batch = {micro_batch}, rank = {rank}, "
                f"world_size = {world_size}, seed = {seed}",
                "use length, micro_batch, world_size >= 1, 0 <= rank < world_size and seed >= 0")
        needed = length * micro_batch * world_size
        if tokens.size < needed:
            raise UserError(
                f"the training data has {tokens.size} tokens, fewer than one global batch of windows "
                f"({micro_batch} x {world_size} ranks x {length} tokens = {needed})",
                "use more data, a smaller data.max_length, a smaller training.batch_size, or fewer ranks")
        self._tokens = tokens
        self._length = length
        self._micro_batch = micro_batch
        self._rank = rank
        self._world_size = world_size
        self._seed = seed
        self._reshuffle = reshuffle_each_epoch
        self._pin_memory = pin_memory
        self._epoch = 0
        self._batch_index = 0  # micro-batches of the current epoch this rank has already yielded

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank in an epoch: as many windows as the stream has tokens (the same on every rank)."""
        return int(self._tokens.size) // (self._length * self._micro_batch * self._world_size)

    def offsets(self, epoch: int, index: int) -> np.ndarray:
        """Start offsets of all ranks' windows of micro-batch `index` of `epoch`, distinct; rank r takes slice r."""
        rng = np.random.default_rng([self._seed, epoch if self._reshuffle else 0, index])
        starts = int(self._tokens.size) - self._length + 1
        return rng.choice(starts, size=self._micro_batch * self._world_size, replace=False)

    def state_dict(self) -> dict[str, int]:
        """Position in the data: the epoch, and how many of its windowed micro-batches this rank has yielded.

        Named `window_batch` (not `batch_index`), so a checkpoint of packed batches
        is not taken for one of random windows, or the other way round.
        """
        return {"epoch": self._epoch, "window_batch": self._batch_index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position taken by `state_dict()` (same data, batch size, world size and seed)."""
        epoch, index = state.get("epoch"), state.get("window_batch")
        if (not isinstance(epoch, int) or not isinstance(index, int) or epoch < 0
                or not 0 <= index <= self.batches_per_epoch):
            raise UserError(
                f"data position {dict(state)} is not a random-windows position here (an epoch has "
                f"{self.batches_per_epoch} micro-batches per rank)",
                "resume with the data.sampling, data, micro batch size and number of ranks the checkpoint was "
                "written with")
        self._epoch, self._batch_index = epoch, index

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._batch_index >= self.batches_per_epoch:
            self._epoch, self._batch_index = self._epoch + 1, 0
        span = np.arange(self._length)
        for index in range(self._batch_index, self.batches_per_epoch):
            mine = self.offsets(self._epoch, index)[self._rank * self._micro_batch:(self._rank + 1) * self._micro_batch]
            rows = np.asarray(self._tokens[mine[:, None] + span], dtype=np.int64)
            # Counted before the batch is handed out: a state_dict taken while the caller holds it resumes after it.
            self._batch_index = index + 1
            batch = torch.from_numpy(rows)
            yield batch.pin_memory() if self._pin_memory else batch
        self._epoch, self._batch_index = self._epoch + 1, 0

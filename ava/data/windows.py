"""Random windows: micro-batches of `max_length` tokens cut at random offsets of a token stream (nanoGPT style).

`data.sampling: random_windows` trains on windows drawn anywhere in the flat
training stream (a `train.bin`, or the packed corpus's rows joined back into
one stream), instead of visiting fixed packed rows: across epochs the model
sees every token in many contexts, not always at the same position of the
same row. A window is exactly the shape of a packed row, `max_length` tokens:
the model shifts the labels itself (`labels=input_ids`), so a window of L
tokens is L - 1 next-token predictions, as a row is.

The offsets of optimizer step k of epoch e are a pure function of (seed, e,
k): every rank draws the same G = micro_batch x world_size x accumulation
distinct offsets, and micro-batch a of the step on rank r takes slice
(a x world_size + r) of them, so the ranks' windows differ (no two windows of
one global batch start at the same token; random windows may still overlap,
as they do in nanoGPT) and a global batch is the same on any number of ranks
with the same global batch -- which lets a run resume on another number of
ranks with the windows it would have drawn. (With accumulation 1 this is the
draw per micro-batch of earlier versions.) An epoch is as many windows as the
stream holds tokens, in whole steps, which is where `eval_strategy: epoch`
evaluates. Resuming is exact: the position is (epoch, windows consumed over
all ranks), and the next batch is recomputed from it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from ava.data.batches import micro_batches_done
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
                 reshuffle_each_epoch: bool, pin_memory: bool = False, accumulation: int = 1) -> None:
        if tokens.ndim != 1:
            raise UserError(f"random windows need a flat token stream, got shape {tuple(tokens.shape)}",
                            "pass the training tokens as one 1-D array")
        if (length < 1 or micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0
                or accumulation < 1):
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
        self._accumulation = accumulation
        self._pin_memory = pin_memory
        self._epoch = 0
        self._batch_index = 0  # micro-batches of the current epoch this rank has already yielded

    def in_steps_of(self, accumulation: int) -> RandomWindows:
        """These windows at the start of their data, drawn per optimizer step of `accumulation` micro-batches
        per rank."""
        return RandomWindows(self._tokens, self._length, self._micro_batch, self._rank, self._world_size,
                             self._seed, self._reshuffle, self._pin_memory, accumulation)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank in an epoch: as many windows as the stream has tokens, in whole optimizer steps
        (the same on every rank); a stream too short for one step keeps the micro-batches that fit."""
        per_batch = self._length * self._micro_batch * self._world_size
        steps = int(self._tokens.size) // (per_batch * self._accumulation)
        return steps * self._accumulation if steps else int(self._tokens.size) // per_batch

    def offsets(self, epoch: int, index: int) -> np.ndarray:
        """Start offsets of all ranks' windows of micro-batch `index` of `epoch`, distinct; rank r takes slice r."""
        step, part = divmod(index, self._accumulation)
        per_batch = self._micro_batch * self._world_size
        starts = int(self._tokens.size) - self._length + 1
        size = min(per_batch * self._accumulation, starts)
        rng = np.random.default_rng([self._seed, epoch if self._reshuffle else 0, step])
        drawn = rng.choice(starts, size=size, replace=False)
        if drawn.size < per_batch * (part + 1):  # a stream too short for a whole step: draw per micro-batch
            rng = np.random.default_rng([self._seed, epoch if self._reshuffle else 0, step, part])
            return rng.choice(starts, size=per_batch, replace=False)
        return drawn[part * per_batch:(part + 1) * per_batch]

    def state_dict(self) -> dict[str, int]:
        """Position in the data: the epoch, how many of its windowed micro-batches this rank has yielded, and the
        windows all ranks have consumed in it (`window_samples`, for a resume on another number of ranks).

        Named `window_batch` (not `batch_index`), so a checkpoint of packed batches
        is not taken for one of random windows, or the other way round.
        """
        return {"epoch": self._epoch, "window_batch": self._batch_index,
                "window_samples": self._batch_index * self._micro_batch * self._world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position taken by `state_dict()`: same data, global batch and seed; when it holds
        `window_samples`, the micro batch and number of ranks may differ (an elastic resume)."""
        epoch = state.get("epoch")
        index = micro_batches_done(state, "window_batch", "window_samples", self._micro_batch, self._world_size)
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

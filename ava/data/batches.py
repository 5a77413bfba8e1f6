"""Deterministic, data-parallel-sharded, resumable batches over packed sequences.

The order of an epoch is a pure function of (seed, epoch), so every rank computes
the same permutation without communicating, and a resumed run can recompute it
from two integers; rank r then takes every world_size-th micro-batch, so the ranks
see disjoint data and all take the same number of steps (a rank with one step
more would hang the others in their next collective).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch

from ava.errors import UserError


class Batches(Protocol):
    """What the training loop needs from its batches; `SequenceBatches`, `StreamingBatches` and `RandomWindows`
    provide it."""

    @property
    def batches_per_epoch(self) -> int: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: Mapping[str, int]) -> None: ...

    def __iter__(self) -> Iterator[torch.Tensor]: ...


def micro_batches_done(state: Mapping[str, int], index_key: str, samples_key: str, micro_batch: int,
                       world_size: int) -> object:
    """The micro-batches per rank a data position has consumed, under this split of the global batch.

    A position with `samples_key` (sequences or windows consumed over all
    ranks) loads under any micro batch x ranks that divides it (an elastic
    resume); an older one has only `index_key`, the count under its own split.
    """
    samples, per_batch = state.get(samples_key), micro_batch * world_size
    if samples is None:
        return state.get(index_key)
    if isinstance(samples, int) and samples >= 0 and samples % per_batch == 0:
        return samples // per_batch
    raise UserError(
        f"data position {dict(state)} is not a whole number of micro-batches here ({samples} {samples_key} "
        f"consumed; a micro-batch over all ranks is {micro_batch} x {world_size} = {per_batch})",
        "resume with the global batch the checkpoint was written with, split so that micro batch x ranks divides it")


class SequenceBatches:
    """Iterate micro-batches of shape (micro_batch, L) from a packed (N, L) array for one rank.

    Iterating yields the batches left in the current epoch, then moves on to the
    next epoch; loop over it once per epoch.  `state_dict()` taken after any
    batch, loaded into a fresh instance, continues with exactly the batch the
    uninterrupted iteration would have yielded next.

    With `drop_last=False` the last global batch is completed by wrapping round to
    the start of the epoch's permutation (as torch's DistributedSampler does), so
    every sequence is seen and every rank still takes the same number of steps; the
    few wrapped sequences are then seen twice in that epoch.

    Optimizer step k takes positions [k G, (k+1) G) of the epoch's permutation,
    G = micro_batch x world_size x `accumulation` the global batch: micro-batch i
    of rank r is the chunk (i x world_size + r) of `micro_batch` positions, and a
    step's `accumulation` micro-batches on every rank are those G positions
    however they are split. An epoch is a whole number of steps. So the data a
    step sees depends on the global batch only, and a run resumed on another
    number of ranks (the same global batch, accumulation re-derived) continues
    with exactly the sequences the original run would have seen: the position
    is kept as global `samples` consumed in the epoch.
    """

    def __init__(
        self,
        sequences: np.ndarray,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        reshuffle_each_epoch: bool,
        drop_last: bool = True,
        pin_memory: bool = False,
        accumulation: int = 1,
    ) -> None:
        if sequences.ndim != 2:
            raise UserError(
                f"packed sequences have shape {tuple(sequences.shape)}, expected (num_sequences, max_length)",
                "pack the documents with ava.data.packing.pack_documents first")
        if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0 or accumulation < 1:
            raise UserError(
                f"invalid batching: micro_batch = {micro_batch}, rank = {rank}, world_size = {world_size}, "
                f"seed = {seed}, accumulation = {accumulation}",
                "use micro_batch >= 1, world_size >= 1, 0 <= rank < world_size, seed >= 0 and accumulation >= 1")
        num_sequences = int(sequences.shape[0])
        if num_sequences < micro_batch * world_size:
            raise UserError(
                f"the dataset has {num_sequences} sequences, fewer than one micro-batch per rank "
                f"(micro_batch {micro_batch} x {world_size} ranks = {micro_batch * world_size})",
                "use more data, a smaller data.max_length, a smaller training.batch_size, or fewer ranks")
        self._sequences = sequences
        self._micro_batch = micro_batch
        self._rank = rank
        self._world_size = world_size
        self._seed = seed
        self._reshuffle = reshuffle_each_epoch
        self._drop_last = drop_last
        self._accumulation = accumulation
        self._pin_memory = pin_memory  # page-locked batches copy to a GPU faster; needs CUDA
        self._epoch = 0
        self._batch_index = 0  # batches of the current epoch this rank has already yielded
        self._fingerprint: str | None = None

    def in_steps_of(self, accumulation: int) -> SequenceBatches:
        """These batches at the start of their data, with epochs cut in optimizer steps of `accumulation`
        micro-batches per rank."""
        return SequenceBatches(self._sequences, self._micro_batch, self._rank, self._world_size, self._seed,
                               self._reshuffle, self._drop_last, self._pin_memory, accumulation)

    @property
    def sequences(self) -> np.ndarray:
        """The packed (N, L) array of all ranks' sequences, in stored order, as a read-only view."""
        view = self._sequences.view()
        view.flags.writeable = False
        return view

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields per epoch (the same on every rank): a whole number of optimizer steps.

        Data too small for one global batch keeps an epoch of the micro-batches
        that fit, as before epochs were counted in steps.
        """
        per_step = self._micro_batch * self._world_size * self._accumulation
        num_sequences = int(self._sequences.shape[0])
        steps = num_sequences // per_step if self._drop_last else -(-num_sequences // per_step)
        if steps == 0:
            return num_sequences // (self._micro_batch * self._world_size)
        return steps * self._accumulation

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of sequence indices for `epoch`, identical on every rank."""
        rng = np.random.default_rng([self._seed, epoch if self._reshuffle else 0])
        order = rng.permutation(int(self._sequences.shape[0]))
        needed = self.batches_per_epoch * self._micro_batch * self._world_size
        if needed > order.size:  # drop_last=False: complete the last global batch from the start
            order = np.concatenate([order, order[: needed - order.size]])
        return order

    @property
    def covered(self) -> int:
        """Sequences one epoch yields over all ranks (what an evaluation over every batch averages)."""
        return self.batches_per_epoch * self._micro_batch * self._world_size

    def fingerprint(self) -> str:
        """A blake2b digest (hex) of the sequences epoch 0 covers, by index, and their shape.

        For held-out batches (whose order never changes) this names the set an
        evaluation measured: two evaluations are comparable only when their
        fingerprints agree. It changes with the held-out data itself and with
        anything that changes which rows an epoch covers (the eval batch size,
        the number of ranks, the seed when the rows do not divide evenly).
        """
        if self._fingerprint is None:
            chosen = np.sort(self.epoch_order(0)[: self.covered])
            digest = hashlib.blake2b(digest_size=16)
            digest.update(np.asarray([chosen.size, self._sequences.shape[1]], dtype=np.int64).tobytes())
            for start in range(0, chosen.size, 4096):  # bounded memory for a large val.bin
                rows = self._sequences[chosen[start:start + 4096]]
                digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict[str, int]:
        """Position in the data: the epoch, how many of its batches this rank has yielded, and the sequences all
        ranks have consumed in it (`samples`, which a run on another number of ranks resumes from)."""
        return {"epoch": self._epoch, "batch_index": self._batch_index,
                "samples": self._batch_index * self._micro_batch * self._world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position taken by `state_dict()`: same data, global batch and seed; when it holds
        `samples`, the micro batch and number of ranks may differ (an elastic resume)."""
        epoch = state.get("epoch")
        batch_index = micro_batches_done(state, "batch_index", "samples", self._micro_batch, self._world_size)
        if (not isinstance(epoch, int) or not isinstance(batch_index, int) or epoch < 0
                or not 0 <= batch_index <= self.batches_per_epoch):
            raise UserError(
                f"data position {dict(state)} is not valid here: an epoch has {self.batches_per_epoch} batches per rank",
                "resume with the same data, micro batch size and number of ranks the checkpoint was written with")
        self._epoch, self._batch_index = epoch, batch_index

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._batch_index >= self.batches_per_epoch:
            self._epoch, self._batch_index = self._epoch + 1, 0
        order = self.epoch_order(self._epoch)
        for index in range(self._batch_index, self.batches_per_epoch):
            start = (index * self._world_size + self._rank) * self._micro_batch
            rows = np.asarray(self._sequences[order[start:start + self._micro_batch]], dtype=np.int64)
            # Count the batch as consumed before handing it out: a state_dict taken while the
            # caller holds this batch must resume with the next one.
            self._batch_index = index + 1
            batch = torch.from_numpy(rows)
            yield batch.pin_memory() if self._pin_memory else batch
        self._epoch, self._batch_index = self._epoch + 1, 0

"""The evaluation set of streamed sources: the first documents of each source, held out from training.

A stream cannot be split at random without reading it all, so the held-out set
is the head of each source, read before mixing and shuffling: it is fixed (the
same on every rank, in every epoch and after a resume).  Training then drops
every document whose text is a held-out one.  Dropping by content rather than
skipping the first n documents matters: when ranks split a stream by files,
`datasets` divides a skip among the files, which would skip the wrong
documents; a content test is the same however the stream is split, and also
keeps exact duplicates of evaluation documents out of training.
Each source gives a share of the held-out sequences (its mixing probability),
so the evaluation set is mixed the way training is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ava.data.packing import pack_documents
from ava.data.tokenizer import Tokenizer, encode_many
from ava.errors import UserError

_END = object()


def text_digest(text: str) -> bytes:
    """A short, process-independent fingerprint of a document's text (Python's own hash is salted per process)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass(frozen=True)
class HeldOut:
    rows: np.ndarray  # (sequences, max_length) int64: the evaluation sequences
    counts: list[int]  # documents read from the head of each source
    digests: frozenset[bytes]  # text_digest of every held-out document

    def keeps(self, texts: Sequence[str | None]) -> list[bool]:
        """For a batch of training texts: False for those that are held out."""
        return [text is None or text_digest(text) not in self.digests for text in texts]


def hold_out_heads(sources: Sequence[Iterable[str | None]], shares: Sequence[float], keys: Sequence[str],
                   tokenizer: Tokenizer, max_length: int, sequences: int) -> HeldOut:
    """`sequences` packed rows from the heads of `sources`, with what training must leave out.

    Source i gives its first documents until they hold ceil(shares[i] * sequences)
    rows' worth of tokens; a source that would be used up entirely is refused,
    since training would then have none of it.
    """
    if sequences <= 0:
        return HeldOut(np.empty((0, max_length), dtype=np.int64), [0] * len(sources), frozenset())
    token_lists: list[np.ndarray] = []
    counts: list[int] = []
    digests: set[bytes] = set()
    for source, share, key in zip(sources, shares, keys, strict=True):
        wanted = math.ceil(share * sequences) * max_length
        documents = iter(source)
        have = taken = 0
        for text in documents:
            taken += 1
            if not text:
                continue
            ids = encode_many(tokenizer, [text])[0]
            token_lists.append(ids)
            digests.add(text_digest(text))
            have += ids.size + 1  # + the end-of-document id packing adds
            if have >= wanted:
                break
        if have < wanted or next(documents, _END) is _END:
            raise UserError(
                f"{key} is used up by its share of the held-out set ({math.ceil(share * sequences)} of "
                f"data.max_eval_examples = {sequences} sequences of {max_length} tokens), leaving nothing to train on",
                "lower data.max_eval_examples (0 holds nothing out), or add data to the source")
        counts.append(taken)
    rows = pack_documents(token_lists, max_length, tokenizer.eos_id)[:sequences]
    return HeldOut(rows, counts, frozenset(digests))

"""Pre-tokenised `.bin` files: a flat array of token ids, memory-mapped and checked once.

The file is memory-mapped rather than read, so a corpus larger than RAM can be
trained on; it is validated in chunks up front, so a corrupt file or a
tokenizer/model mismatch fails at start-up, with the position, rather than as
an index error deep inside the embedding hours into a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ava.errors import UserError

TokenDtype = Literal["uint16", "uint32"]

# Tokens scanned per validation step: bounds the extra memory to a few tens of MB.
_CHUNK_TOKENS = 1 << 22


def open_token_file(
    path: str | Path, vocab_size: int, dtype: TokenDtype = "uint16", chunk_tokens: int = _CHUNK_TOKENS,
) -> np.memmap:
    """Memory-map `path` as a flat array of `dtype` token ids, after checking every id is < `vocab_size`.

    uint16 suffices for vocabularies up to 65536; uint32 is needed beyond.
    """
    path = Path(path)
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"token file {path}: dtype {dtype!r} is not supported", "use 'uint16' or 'uint32'")
    itemsize = np.dtype(dtype).itemsize
    if not path.is_file():
        raise UserError(f"token file {path} does not exist", "check data.data_dir, or tokenise the corpus first")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"token file {path} is empty", "re-run tokenisation; the file holds no tokens")
    if size % itemsize:
        raise UserError(
            f"token file {path} is {size} bytes, not a multiple of {itemsize} ({dtype}): "
            "truncated, or written with another dtype",
            "re-run tokenisation, or pass the dtype the file was written with")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    for start in range(0, tokens.size, chunk_tokens):
        chunk = np.asarray(tokens[start:start + chunk_tokens])
        bad = np.flatnonzero(chunk >= vocab_size)
        if bad.size:
            position = start + int(bad[0])
            raise UserError(
                f"token file {path}: token at position {position} is {int(chunk[bad[0]])}, "
                f"beyond the vocabulary (vocab_size = {vocab_size})",
                "tokenise with the tokenizer the model is configured for, or raise model.vocab_size; "
                "if the ids look random, the file may have been written with another dtype")
    return tokens

"""Tokenizers: a built-in byte tokenizer and `tokenizer.json` files, behind one small Protocol.

The byte tokenizer needs no file and covers every string, so a smoke run works
offline; a trained `tokenizer.json` (Hugging Face `tokenizers`) is used for
real runs.  Either must fit the model's embedding, which `check_vocab` enforces
before any token reaches the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from ava.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer, and nothing more."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus 256 marking the end of a document."""

    vocab_size: int = 257
    eos_id: int = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`; no end-of-document id (packing adds it)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; end-of-document ids are dropped and broken UTF-8 becomes U+FFFD.

        A model's sample can end in the middle of a multi-byte character, so
        decoding must never raise.
        """
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


# Names a `tokenizer.json` commonly gives its end-of-document token, most specific first.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>", "[SEP]")


class FileTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` loaded from a `tokenizer.json`."""

    def __init__(self, tokenizer: HFTokenizer, eos_id: int, path: Path) -> None:
        self._tokenizer = tokenizer
        self.eos_id = eos_id
        self.path = path

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`, for saving it beside a model."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size including added tokens: the embedding must have a row for every id."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        # No special tokens: documents are delimited by packing, not by the template.
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once: the Rust library spreads them over its threads."""
        return [list(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def load_tokenizer(path: str | Path, eos_id: int | None = None) -> FileTokenizer:
    """Load a `tokenizer.json` (or a directory holding one); its end-of-document token must be known.

    `eos_id` is that token's id when something recorded it (a model directory's
    `special_tokens.json`, a Hugging Face config.json); otherwise it is found
    by its usual names.
    """
    from tokenizers import Tokenizer as HFTokenizer  # imported here: only file tokenizers need the library

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"tokenizer file {path} does not exist",
            "point data.tokenizer_name at a tokenizer.json (or its directory), or set it to null for the byte tokenizer")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises plain Exception for any parse failure
        raise UserError(
            f"tokenizer file {path} could not be read as a tokenizer.json: {error}",
            "regenerate it with tokenizers' Tokenizer.save(), or set data.tokenizer_name to null") from error
    if eos_id is not None:
        return FileTokenizer(hf, eos_id, path)
    for name in _EOS_NAMES:
        eos = hf.token_to_id(name)
        if eos is not None:
            return FileTokenizer(hf, int(eos), path)
    raise UserError(
        f"tokenizer file {path} has none of the end-of-document tokens {', '.join(_EOS_NAMES)}",
        "add one of them as a special token, so that packed documents can be told apart")


TOKENIZER_FILE = "tokenizer.json"  # the name a model directory (and Hugging Face) gives its tokenizer
# Beside it in an Ava model directory: the special ids and where the tokenizer came from (`ava.data.model_tokens`).
SPECIAL_TOKENS_FILE = "special_tokens.json"
BYTE_EOS_TOKEN = "<|endoftext|>"  # the byte tokenizer's id 256, spelled as a token in its tokenizer.json


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, which byte-level `tokenizers` models spell bytes with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable, strict=True))
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + extra
            extra += 1
    return {byte: chr(code) for byte, code in chars.items()}


def byte_tokenizer_json() -> HFTokenizer:
    """The byte tokenizer as a `tokenizers.Tokenizer`: byte b is id b, `<|endoftext|>` is 256.

    A byte-level BPE with no merges, so any library that reads a
    `tokenizer.json` (Hugging Face's `AutoTokenizer` included) encodes text to
    exactly the ids `ByteTokenizer` gives, and a model trained on bytes can be
    handed on with a tokenizer file like any other.  The one difference: this
    file turns the literal text `<|endoftext|>` into id 256, where
    `ByteTokenizer` spells it out in bytes.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    stand_in = _bytes_to_unicode()
    tokenizer = HFTokenizer(models.BPE(vocab={stand_in[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BYTE_EOS_TOKEN])
    return tokenizer


def _is_byte_tokenizer(tokenizer: HFTokenizer) -> bool:
    stand_in = _bytes_to_unicode()
    expected = {stand_in[b]: b for b in range(256)} | {BYTE_EOS_TOKEN: ByteTokenizer.eos_id}
    return bool(tokenizer.get_vocab(with_added_tokens=True) == expected)


def as_hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """`tokenizer` as a `tokenizers.Tokenizer`: what gets saved, and what names its special tokens."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokenizer_json()
    if isinstance(tokenizer, FileTokenizer):
        return tokenizer.hf_tokenizer
    raise TypeError(f"cannot save a {type(tokenizer).__name__}: only the byte tokenizer and tokenizer.json files")


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write `tokenizer` as `directory/tokenizer.json` (atomically); returns the file.

    Bytes and trained BPEs alike, so a model directory always says how its ids
    become text.
    """
    out = Path(directory) / TOKENIZER_FILE
    hf = as_hf_tokenizer(tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    hf.save(str(partial))
    partial.replace(out)
    return out


def load_saved_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved in a model directory by `save_tokenizer`, or None when it holds none.

    The byte tokenizer's file comes back as `ByteTokenizer`, so ids decode
    exactly as they did in training.
    """
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return None
    loaded = load_tokenizer(path, _recorded_eos(Path(directory) / SPECIAL_TOKENS_FILE))
    return ByteTokenizer() if _is_byte_tokenizer(loaded.hf_tokenizer) else loaded


def _recorded_eos(path: Path) -> int | None:
    """The eos id a `special_tokens.json` records (a Hugging Face import's may bear no usual name), else None."""
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    return eos if isinstance(eos, int) else None


def encode_many(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (int64) of each text, by the fastest path the tokenizer offers.

    Bytes are the ids of the byte tokenizer, so it skips the Python-int round trip;
    a file tokenizer encodes the whole batch in parallel.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) for text in texts]
    if isinstance(tokenizer, FileTokenizer):
        return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    return [np.asarray(tokenizer.encode(text), dtype=np.int64) for text in texts]


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> None:
    """Refuse a tokenizer that can emit ids the model's embedding has no row for.

    `where` names the setting or file the tokenizer came from, for the message.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise UserError(
            f"{where}: tokenizer vocabulary {tokenizer.vocab_size} exceeds model.vocab_size = {model_vocab_size}",
            f"set model.vocab_size to at least {tokenizer.vocab_size}, or use a smaller tokenizer")

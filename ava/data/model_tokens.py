"""What a model hands on about its tokens: the tokenizer that made its ids, and its special ids.

A model's weights mean nothing without the tokenizer that turned text into
ids, and a generator stops on the wrong token unless it is told which id ends
a document (Hugging Face's defaults are Llama's eos 2 / bos 1, or GPT-2's
50256; Ava's byte tokenizer ends a document with 256). So every Ava model
directory a run, an export or an RLHF stage writes holds, beside
`ava_model.yaml` and `model.safetensors`:

- `tokenizer.json`: the tokenizer, for bytes (a byte-level BPE without merges,
  id for id the byte tokenizer) or a trained/loaded one. Absent for token-file
  (`data_dir`) and Markov runs, which have no text tokenizer.
- `special_tokens.json`: eos/bos/pad ids and where the tokenizer came from, so
  that even a token-file run (whose `data.eos_token_id` is known) exports
  correct ids.

Ava has no bos or pad token: packing puts eos between documents, so a
document the model saw followed an eos, and eos serves as bos and pad too (the
GPT-2 convention). An imported Hugging Face model keeps its own ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ava.config.schema.data import DataConfig
from ava.data.tokenizer import (
    SPECIAL_TOKENS_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    FileTokenizer,
    Tokenizer,
    as_hf_tokenizer,
    load_saved_tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from ava.errors import UserError

BPE = "bpe"  # data.tokenizer_name's value that trains a BPE on the corpus


@dataclass(frozen=True)
class ModelTokens:
    """A model's tokenizer (None: its data had no text tokenizer) and its special ids (None: unknown)."""

    tokenizer: Tokenizer | None
    kind: str  # "byte", "bpe" (trained on the corpus), "file" (a given tokenizer.json) or "none"
    source: str  # where the tokenizer came from, or why there is none, for people
    eos_id: int | None
    bos_id: int | None = None
    pad_id: int | None = None

    @classmethod
    def of(cls, tokenizer: Tokenizer, kind: str | None = None, source: str | None = None) -> ModelTokens:
        """An Ava-trained model's tokens: eos also serves as bos and pad (see the module docstring)."""
        if kind is None:
            kind = "byte" if isinstance(tokenizer, ByteTokenizer) else "file"
        if source is None:
            source = str(tokenizer.path) if isinstance(tokenizer, FileTokenizer) else "the built-in byte tokenizer"
        eos = tokenizer.eos_id
        return cls(tokenizer, kind, source, eos, eos, eos)

    def token(self, token_id: int | None) -> str | None:
        """The text of a special token (for Hugging Face's tokenizer_config.json), when there is a tokenizer."""
        if self.tokenizer is None or token_id is None:
            return None
        text = as_hf_tokenizer(self.tokenizer).id_to_token(token_id)
        return str(text) if text is not None else None

    def ids(self) -> dict[str, int | None]:
        """The special ids by their Hugging Face config.json names; None where unknown."""
        return {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    def as_dict(self, directory: Path | None = None) -> dict[str, Any]:
        """summary.json's `tokenizer` entry; `directory`: where the model's copy of it was saved."""
        saved = directory / TOKENIZER_FILE if directory is not None and self.tokenizer is not None else None
        return {"kind": self.kind, "source": self.source, "path": str(saved) if saved else None,
                "vocab_size": self.tokenizer.vocab_size if self.tokenizer is not None else None, **self.ids()}

    def describe(self) -> str:
        """One line for the run's header and config.yaml."""
        if self.tokenizer is None:
            return f"no text tokenizer ({self.source}); eos id {_shown(self.eos_id)}"
        what = {"byte": "byte tokenizer", "bpe": "byte-level BPE trained on the corpus"}.get(self.kind, "tokenizer")
        where = "" if self.kind == "byte" else f" ({self.source})"
        return f"{what}{where}: {self.tokenizer.vocab_size} tokens, eos id {_shown(self.eos_id)}"

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` (when there is a tokenizer) and `special_tokens.json` into a model directory.

        A directory whose model has no text tokenizer loses any stale
        `tokenizer.json`, which would otherwise claim to decode its ids.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is not None:
            save_tokenizer(self.tokenizer, out)
        elif self.kind == "none":
            (out / TOKENIZER_FILE).unlink(missing_ok=True)
        record = {"kind": self.kind, "source": self.source,
                  "tokenizer_file": TOKENIZER_FILE if self.tokenizer is not None else None, **self.ids()}
        partial = out / (SPECIAL_TOKENS_FILE + ".partial")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(out / SPECIAL_TOKENS_FILE)


def tokens_for_data(data: DataConfig, tokenizer: Tokenizer | None = None) -> ModelTokens:
    """The tokens of a model trained on `data`, whose pipeline built `tokenizer` (None: build it from `data`).

    Rebuilding never trains: a BPE that is not at hand is reported missing
    (kind "bpe", no tokenizer) rather than trained anew, and a named
    tokenizer.json that has gone is reported the same way, so an export from an
    old run still writes what it can.
    """
    if data.data_dir is not None:
        return _token_file_tokens(data)
    if not data.sources and data.builtin_dataset == "markov":
        return ModelTokens(None, "none", "the built-in Markov corpus: its ids stand for no text", None)
    if tokenizer is not None:
        kind = BPE if data.tokenizer_name == BPE else ("byte" if isinstance(tokenizer, ByteTokenizer) else "file")
        return ModelTokens.of(tokenizer, kind)
    if data.tokenizer_name is None:
        return ModelTokens.of(ByteTokenizer())
    if data.tokenizer_name == BPE:
        return ModelTokens(None, BPE, "a BPE trained for the run, which is no longer at hand", None)
    try:
        return ModelTokens.of(load_tokenizer(data.tokenizer_name))
    except UserError as error:
        return ModelTokens(None, "file", f"data.tokenizer_name {data.tokenizer_name}, unreadable: {error.message}",
                           None)


def _token_file_tokens(data: DataConfig) -> ModelTokens:
    """Token files hold ids only; a tokenizer.json named beside them (or inherited from init_from) goes along."""
    assert data.data_dir is not None
    eos = data.eos_token_id
    name = data.tokenizer_name
    if name and name != BPE:
        try:
            loaded = load_tokenizer(name, eos)
        except UserError:
            loaded = None
        if loaded is not None:
            return ModelTokens(loaded, "file", str(loaded.path), loaded.eos_id, loaded.eos_id, loaded.eos_id)
    return ModelTokens(None, "none", f"token files in {data.data_dir}: no text tokenizer", eos, eos, eos)


def read_model_tokens(directory: str | Path) -> ModelTokens | None:
    """The tokens saved in an Ava model directory (by `ModelTokens.save` or import), or None when it holds none."""
    path = Path(directory)
    record: dict[str, Any] = {}
    if (path / SPECIAL_TOKENS_FILE).is_file():
        try:
            record = json.loads((path / SPECIAL_TOKENS_FILE).read_text())
        except ValueError as error:
            raise UserError(f"{path / SPECIAL_TOKENS_FILE} is not valid JSON ({error})",
                            f"delete it (the tokenizer is then read from {TOKENIZER_FILE} alone) or re-export "
                            "the model") from error
    tokenizer = load_saved_tokenizer(path)
    if tokenizer is None and not record:
        return None
    if tokenizer is not None and not record:  # a tokenizer.json copied in by hand
        return ModelTokens.of(tokenizer, source=str(path / TOKENIZER_FILE))
    kind = record.get("kind") or ("byte" if isinstance(tokenizer, ByteTokenizer) else "file")
    return ModelTokens(tokenizer, kind, str(record.get("source") or path / TOKENIZER_FILE),
                       _id(record, "eos_token_id"), _id(record, "bos_token_id"), _id(record, "pad_token_id"))


def _shown(token_id: int | None) -> str:
    return "unknown" if token_id is None else str(token_id)


def _id(record: dict[str, Any], key: str) -> int | None:
    value = record.get(key)
    return value if isinstance(value, int) else None

"""A model's tokenizer and special ids, in the files Hugging Face reads, and back.

Export writes what `AutoTokenizer.from_pretrained` needs (`tokenizer.json`,
`tokenizer_config.json` naming `PreTrainedTokenizerFast` and its eos/bos/pad
tokens, `special_tokens_map.json`) and puts the ids in `config.json` and
`generation_config.json`: without them `transformers` assumes its family's
defaults (eos 2 for Llama), and `generate` stops on the wrong token. An id
that is not known (a Markov or token-file run with no `data.eos_token_id`) is
written as null, never a default, so nothing stops early on a guess.

Import reads them back: the HF directory's `tokenizer.json` and the ids its
config.json (or generation_config.json) gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ava.data.model_tokens import ModelTokens
from ava.data.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer
from ava.errors import UserError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def write_hf_tokens(tokens: ModelTokens | None, directory: Path, max_length: int) -> None:
    """The tokenizer files (when there is a tokenizer) and generation_config.json, into an HF export.

    `max_length` is the model's context (tokenizer_config's model_max_length).
    config.json gets the same ids from `token_ids`.
    """
    tokens = tokens or ModelTokens(None, "none", "unknown", None)
    _write_json(directory / GENERATION_CONFIG_FILE, tokens.ids())
    if tokens.tokenizer is None:
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):  # an overwritten export's
            (directory / name).unlink(missing_ok=True)
        return
    save_tokenizer(tokens.tokenizer, directory)
    names = {f"{role}_token": tokens.token(token_id) for role, token_id in
             (("bos", tokens.bos_id), ("eos", tokens.eos_id), ("pad", tokens.pad_id))}
    names = {k: v for k, v in names.items() if v is not None}
    _write_json(directory / SPECIAL_TOKENS_MAP_FILE, names)
    # No cleanup of spaces before punctuation, and no bos added: the ids and text must be exactly Ava's.
    _write_json(directory / TOKENIZER_CONFIG_FILE, {
        "tokenizer_class": "PreTrainedTokenizerFast", **names, "model_max_length": max_length,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False})


def token_ids(tokens: ModelTokens | None) -> dict[str, int | None]:
    """config.json's bos/eos/pad ids: the model's, or null (not the family's default) where unknown."""
    return tokens.ids() if tokens is not None else {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def read_hf_tokens(directory: Path) -> ModelTokens | None:
    """The tokenizer and special ids of a Hugging Face checkpoint directory; None when it states neither.

    A tokenizer.json this `tokenizers` cannot read is left behind with a
    UserError: the weights are still worth importing, so the caller decides.
    """
    ids = _hf_ids(directory)
    if not (directory / TOKENIZER_FILE).is_file():
        if all(v is None for v in ids.values()):
            return None
        return ModelTokens(None, "none", f"{directory}: no {TOKENIZER_FILE}", ids["eos_token_id"],
                           ids["bos_token_id"], ids["pad_token_id"])
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE, ids["eos_token_id"])
    return ModelTokens(tokenizer, "file", str(directory / TOKENIZER_FILE), tokenizer.eos_id, ids["bos_token_id"],
                       ids["pad_token_id"])


def _hf_ids(directory: Path) -> dict[str, int | None]:
    """bos/eos/pad from config.json, each filled from generation_config.json where config.json lacks it."""
    found: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    for name in (GENERATION_CONFIG_FILE, "config.json"):  # config.json last: it wins
        record = _read_json(directory / name)
        for key in found:
            value = record.get(key)
            if isinstance(value, list) and value:  # Llama 3 lists several eos ids: the first ends a document
                value = value[0]
            if isinstance(value, int):
                found[key] = value
    return found


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error})",
                        "restore the file from the checkpoint's source") from error
    return record if isinstance(record, dict) else {}


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")

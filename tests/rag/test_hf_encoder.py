"""A local Hugging Face encoder (RETRO's frozen BERT) as the chunk encoder: a tiny random BertModel saved to disk."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from ava.data.packing import pack_documents
from ava.data.tokenizer import ByteTokenizer
from ava.errors import UserError
from ava.rag import HFEncoder, Retriever, build_store

transformers = pytest.importorskip("transformers", reason="dev dependency: pip install -e .[dev]")
CHUNK = 16


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A 1-layer, 32-wide BertModel and a character-level WordPiece tokenizer, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("bert")
    characters = list(string.ascii_letters + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + [f"##{c}" for c in characters]
    tokenizer = transformers.BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    assert tokenizer.tokenize("ab") == ["a", "##b"]
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    model.save_pretrained(directory / "encoder")
    tokenizer.save_pretrained(directory / "encoder")
    return directory / "encoder"


def _text_rows() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud", "seven", "north"]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(12)]
    tokenizer = ByteTokenizer()
    return pack_documents([tokenizer.encode(t) for t in texts], 4 * CHUNK, tokenizer.eos_id), texts


def test_a_store_built_with_a_local_hf_encoder_finds_a_near_duplicate(tmp_path, bert_dir):
    tokenizer = ByteTokenizer()
    rows, _ = _text_rows()
    encoder = HFEncoder(bert_dir, tokenizer.decode)
    info = build_store(rows, tokenizer.eos_id, encoder, tmp_path / "s", CHUNK, "exact")
    assert info.dim == 32 and "Hugging Face encoder" in info.encoder
    chunks = rows.reshape(-1, CHUNK)
    target = next(i for i in range(5, len(chunks)) if tokenizer.eos_id not in chunks[i])
    query = chunks[target].copy()
    query[3] = ord("Q") if query[3] != ord("Q") else ord("Z")  # one character changed: not in the store
    with pytest.raises(UserError, match="no tokenizer was given"):
        Retriever.open(tmp_path / "s")
    retriever = Retriever.open(tmp_path / "s", decode=tokenizer.decode)
    got = retriever.neighbours(torch.from_numpy(query[None]), k=1)
    assert got[0, 0, 0, :CHUNK].tolist() == chunks[target].tolist()


def test_a_changed_hf_encoder_is_refused_at_open(tmp_path, bert_dir):
    import shutil

    tokenizer = ByteTokenizer()
    rows, _ = _text_rows()
    copy = tmp_path / "encoder"
    shutil.copytree(bert_dir, copy)
    build_store(rows, tokenizer.eos_id, HFEncoder(copy, tokenizer.decode), tmp_path / "s", CHUNK, "exact")
    model = transformers.BertModel.from_pretrained(copy)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.01)
    model.save_pretrained(copy)
    with pytest.raises(UserError, match="has changed since the store"):
        Retriever.open(tmp_path / "s", decode=tokenizer.decode)


def test_an_hf_encoder_path_without_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no Hugging Face model there"):
        HFEncoder(tmp_path, ByteTokenizer().decode)

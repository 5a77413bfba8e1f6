"""Fixtures the recipe tests share: a tiny pre-tokenised dataset and a tiny Hugging Face GPT-2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

VOCAB = 128  # token ids of the tiny .bin data; every shrunk recipe uses this vocabulary


def write_token_dir(directory: Path, train_tokens: int = 16384, val_tokens: int = 2048) -> Path:
    """train.bin/val.bin (uint16, nanoGPT layout) of a learnable sequence: mostly +1 steps, some noise."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.bin", train_tokens), ("val.bin", val_tokens)):
        steps = np.where(rng.random(n) < 0.9, 1, rng.integers(0, VOCAB, n))
        tokens = (np.cumsum(steps) % VOCAB).astype(np.uint16)
        tokens.tofile(directory / name)
    return directory


def save_tiny_gpt2(directory: Path, n_positions: int = 64) -> Path:
    """A randomly initialised GPT-2 (2 layers, 64 wide) saved as Hugging Face writes a pretrained one."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1,
                        eos_token_id=VOCAB - 1)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))

"""Fixtures of the data tests: no network, caches in temporary directories, small corpora on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before `datasets` is imported: it reads them once. Local builders need no hub; a test must never reach it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trained tokenizers and Arrow caches go to a temporary directory, never ~/.cache."""
    cache = tmp_path_factory.mktemp("ava-cache")
    monkeypatch.setenv("AVA_CACHE_DIR", str(cache))
    return cache

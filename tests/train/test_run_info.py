"""`run_info`: the versions, commit and host a run records, and its memory peak."""

from __future__ import annotations

import json
import platform
import re
import subprocess

import numpy
import pytest
import torch

import ava
from ava.train.runtime.run_info import PACKAGES, library_versions, peak_memory, write_versions
from tests.conftest import REPO


def test_versions_name_python_ava_and_the_installed_libraries():
    versions = library_versions()
    assert {"python", "platform", "ava", "cuda", "cudnn", "git_commit", "git_dirty", "hostname", "command"} <= set(versions)
    assert set(PACKAGES) <= set(versions)
    assert versions["python"] == platform.python_version() and versions["ava"] == ava.__version__
    assert versions["torch"] == torch.__version__ and versions["numpy"] == numpy.__version__
    assert versions["cuda"] == torch.version.cuda
    assert versions["deepspeed"] and versions["wandb"] and versions["rich"]
    assert versions["hostname"] and "pytest" in versions["command"]


def test_a_library_that_is_not_installed_is_recorded_as_null(monkeypatch):
    monkeypatch.setattr("ava.train.runtime.run_info.PACKAGES", ("torch", "no-such-package-ava-test"))
    versions = library_versions()
    assert versions["no-such-package-ava-test"] is None and versions["torch"] == torch.__version__


def test_the_git_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    versions = library_versions()
    assert versions["git_commit"] == head.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", versions["git_commit"])
    assert isinstance(versions["git_dirty"], bool)


def test_without_git_the_commit_is_null(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to find
    versions = library_versions()
    assert versions["git_commit"] is None and versions["git_dirty"] is None


def test_write_versions_writes_the_same_record_as_json(tmp_path):
    path = write_versions(tmp_path / "versions.json")
    assert path == tmp_path / "versions.json"
    written = json.loads(path.read_text())
    assert written["torch"] == torch.__version__ and written["ava"] == ava.__version__


def test_peak_memory_reports_this_processs_max_rss_in_gib():
    held = b"\x01" * (256 * 2**20)  # touched pages, so they count in the resident set
    memory = peak_memory()
    assert 256 / 1024 <= memory["memory/max_rss_gb"] < 1024
    del held
    if not torch.cuda.is_available():
        assert set(memory) == {"memory/max_rss_gb"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_reports_the_allocators_peaks():
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    memory = peak_memory()
    assert memory["memory/peak_allocated_gb"] >= 0.25 and memory["memory/peak_reserved_gb"] >= 0.25
    del x

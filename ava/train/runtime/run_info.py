"""What a run needs to record to be reproduced and compared: library versions, commit, host, memory peak.

Versions come from installed package metadata rather than imports, so
recording them never imports a heavy optional library (transformers) into
the training process; a package that is not installed is recorded as null.
"""

from __future__ import annotations

import json
import platform
import resource
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import ava

PACKAGES = ("torch", "deepspeed", "numpy", "pydantic", "datasets", "tokenizers", "transformers", "wandb", "rich",
            "torchao", "safetensors", "tensorboard")
GiB = 2**30


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    """Output of a git command in the Ava checkout, or None (no git, not a checkout, or too slow)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def library_versions() -> dict:
    """Python, platform, Ava and library versions, CUDA/cuDNN, the Ava git commit, host and command line."""
    import torch

    repo = Path(ava.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo) if commit else None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ava": ava.__version__,
        **{name: _version(name) for name in PACKAGES},
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),  # uncommitted changes to tracked files
        "hostname": socket.gethostname(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def write_versions(path: Path) -> Path:
    """Write `library_versions()` as JSON to `path` (a run's versions.json); returns the path."""
    path.write_text(json.dumps(library_versions(), indent=2) + "\n")
    return path


def peak_memory() -> dict[str, float]:
    """Peak memory of this process in GiB: the host's max RSS, and on CUDA the allocator's peaks.

    ru_maxrss is kilobytes on Linux but bytes on macOS.
    """
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"memory/max_rss_gb": rss / GiB}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GiB
        out["memory/peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GiB
    return out

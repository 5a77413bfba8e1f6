"""scripts/setup.sh picks the right torch: keep an installed one, CUDA with a driver, else the CPU build."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _choice(tmp_path: Path, *, torch_importable: bool, driver: bool, spec: str | None = None) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_python = _exe(tmp_path / "python", "exit 0" if torch_importable else "exit 1")
    if driver:
        _exe(bin_dir / "nvidia-smi", "echo 'GPU 0: NVIDIA H100'")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(fake_python)}
    if spec:
        env["AVA_TORCH_SPEC"] = spec
    out = subprocess.run(["bash", str(REPO / "scripts/setup.sh"), "--print-torch-choice"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(os.name != "posix", reason="setup.sh is a bash script")
def test_cpu_machine_without_torch_gets_the_cpu_build(tmp_path):
    assert _choice(tmp_path, torch_importable=False, driver=False) == "torch==2.13.0"


def test_gpu_machine_without_torch_gets_the_default_cuda_build(tmp_path):
    assert _choice(tmp_path, torch_importable=False, driver=True) == "torch"


@pytest.mark.parametrize("driver", [False, True])
def test_an_installed_torch_is_kept(tmp_path, driver):
    assert _choice(tmp_path, torch_importable=True, driver=driver) == "keep"


def test_the_choice_can_be_overridden(tmp_path):
    assert _choice(tmp_path, torch_importable=True, driver=True, spec="torch==2.5.1") == "torch==2.5.1"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    assert "make test" in readme and ci.strip().splitlines()[-1] == "make test"

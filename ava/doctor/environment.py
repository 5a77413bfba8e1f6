"""What this machine offers a training run: versions, accelerator, backend, launcher, precisions, tools, op builds.

Gathered without starting a job, so `ava doctor` answers in seconds even
where a training job would hang: the fp16 verdict asks DeepSpeed and runs
one tiny fp16 step in this process (`ava.doctor.fp16_probe`), and DeepSpeed's
op-build cache is looked at, not built (`ava.train.runtime.op_build`). The
one active check (a real multi-rank ZeRO-3 step) lives in
`ava.doctor.zero3_probe`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ava.train.runtime.op_build import OpLock, default_root, extensions_dir, find_locks
from ava.train.runtime.run_info import library_versions

# Launcher and scheduler variables worth showing: a stale one explains many "wrong world size" reports.
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_NTASKS",
               "SLURM_NNODES", "SLURM_PROCID", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")
OPTIONAL = {"peft": "LoRA (training.lora, rlhf.lora)", "torchao": "FP8 training (mixed_precision: fp8)",
            "transformers": "Hugging Face parity tests", "wandb": "W&B logging (training.wandb_log)",
            "tensorboard": "TensorBoard logging (training.tensorboard_dir)",
            "transformer_engine": "fp8_backend: transformer_engine"}


@dataclass
class Environment:
    """The facts `ava doctor` prints; `problems` are what stops training here, each with its fix."""

    versions: dict
    accelerator: str
    backend: str
    devices: list[str]
    precisions: dict[str, str]  # precision -> "yes", "emulated" or why not
    launch: dict[str, str]
    optional: dict[str, bool]
    tools: dict[str, str | None]
    op_builds: str = ""  # where DeepSpeed's ops build for a run from here, and who chose it
    op_locks: list[OpLock] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        v = self.versions
        rows = [("ava", f"{v['ava']} (git {str(v.get('git_commit') or 'n/a')[:10]}"
                        f"{', uncommitted changes' if v.get('git_dirty') else ''})"),
                ("python", f"{v['python']} on {v['platform']}"),
                ("torch", f"{v['torch']} (CUDA {v['cuda'] or 'none'}, cuDNN {v['cudnn'] or 'none'})"),
                ("deepspeed", str(v["deepspeed"])),
                ("accelerator", f"{self.accelerator}; backend {self.backend}"),
                ("devices", "; ".join(self.devices) or "none")]
        rows += [(f"precision {name}", state) for name, state in self.precisions.items()]
        rows.append(("launcher variables", ", ".join(f"{k}={v}" for k, v in self.launch.items()) or "none set"))
        rows += [(f"optional {name}", ("installed" if ok else "not installed") + f": {OPTIONAL[name]}")
                 for name, ok in self.optional.items()]
        rows += [(f"tool {name}", path or "not found") for name, path in self.tools.items()]
        rows.append(("op builds", self.op_builds))
        rows += [("op-build lock", f"{lock.path}: {lock.state()}") for lock in self.op_locks]
        return rows


def _cuda_devices() -> list[str]:
    import torch

    return [f"cuda:{i} {torch.cuda.get_device_name(i)} "
            f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB "
            f"(sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())]


def _precisions(accelerator: str) -> dict[str, str]:
    import torch

    from ava.doctor.fp16_probe import probe_fp16

    optional_torchao = _installed("torchao")
    fp16 = probe_fp16(accelerator).verdict()
    if accelerator == "cuda":
        capability = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        fp8 = "yes" if capability >= (8, 9) else f"emulated: sm_{capability[0]}{capability[1]} has no FP8 units"
        return {"fp32": "yes", "bf16": "yes" if torch.cuda.is_bf16_supported() else "no: needs Ampere or newer",
                "fp16": fp16, "fp8": fp8 if optional_torchao else "no: install torchao"}
    return {"fp32": "yes", "bf16": "yes (DeepSpeed CPU accelerator)", "fp16": fp16,
            "fp8": "emulated (a bf16 matmul of the FP8 values): correct, slower than bf16" if optional_torchao
            else "no: install torchao"}


def _op_locks(active: Path) -> list[OpLock]:
    """Build locks in the directory a run from here uses, then in torch's cache root (every venv, every flavour)."""
    locks = {lock.path: lock for lock in find_locks(active)}
    for lock in find_locks(default_root(), depth=3):
        locks.setdefault(lock.path, lock)
    return list(locks.values())


def launcher_path() -> str | None:
    """The deepspeed launcher on PATH, else the one beside this Python (a venv that is not activated)."""
    import sys

    beside = Path(sys.executable).with_name("deepspeed")
    return shutil.which("deepspeed") or (str(beside) if beside.is_file() else None)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def gather() -> Environment:
    """Everything that can be known without starting a job."""
    import torch

    versions = library_versions()
    cuda = torch.cuda.is_available()
    forced = os.environ.get("DS_ACCELERATOR")
    accelerator = forced or ("cuda" if cuda else "cpu")
    backend = "nccl" if accelerator == "cuda" else "gloo"
    devices = _cuda_devices() if accelerator == "cuda" and cuda else [f"cpu: {os.cpu_count()} cores"]
    env = Environment(
        versions=versions, accelerator=accelerator, backend=backend, devices=devices,
        precisions=_precisions(accelerator if cuda or accelerator == "cpu" else "cpu"),
        launch={k: os.environ[k] for k in LAUNCH_VARS if k in os.environ},
        optional={name: _installed(name) for name in OPTIONAL},
        tools={"deepspeed launcher": launcher_path(), "C++ compiler": shutil.which("c++") or
               shutil.which("g++"), "ninja": shutil.which("ninja"), "sbatch": shutil.which("sbatch")})
    if accelerator == "cuda" and not cuda:
        env.problems.append("DS_ACCELERATOR=cuda but torch sees no CUDA device: unset DS_ACCELERATOR, or check the "
                            "driver (nvidia-smi) and that torch is a CUDA build")
    if not cuda and forced != "cpu":
        env.problems.append("no GPU and DS_ACCELERATOR is not set: DeepSpeed guesses the accelerator; export "
                            "DS_ACCELERATOR=cpu on CPU machines (make does it for you)")
    if env.tools["deepspeed launcher"] is None:
        env.problems.append("the deepspeed launcher is not installed: pip install deepspeed (make setup does)")
    if env.tools["C++ compiler"] is None:
        env.problems.append("no C++ compiler: DeepSpeed builds its CPU ops (Adam, shared-memory all-reduce) on first "
                            "use; install one (apt install g++)")
    builds = extensions_dir()
    env.op_builds = builds.describe()
    env.op_locks = _op_locks(builds.path)
    for lock in env.op_locks:
        if lock.stale and lock.path.parent.parent == builds.path:
            env.problems.append(f"DeepSpeed op-build lock {lock.path} is {lock.state()}")
    if "WORLD_SIZE" in env.launch and "RANK" not in env.launch:
        env.problems.append(f"WORLD_SIZE={env.launch['WORLD_SIZE']} is set without RANK: a leftover from another "
                            "job makes train.py plan the batch for the wrong world size; unset it")
    return env

"""What the end-to-end training tests share: the small run's flags, its environment, a free port, its losses."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from tests.conftest import REPO

TINY = ["--config", "configs/gpu/tiny.yaml", "--hardware_config", "configs/hardware/cpu.yaml"]
SMALL_RUN = ["--builtin_dataset", "markov", "--max_length", "64", "--batch_size", "4", "--eval_batch_size", "4",
             "--max_eval_examples", "16", "--warmup_steps", "2", "--logging_steps", "4"]


def run_env() -> dict[str, str]:
    """CPU DeepSpeed, the repo importable, and no launcher variables leaking in from the test runner."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def free_port() -> str:
    """A port free right now: each launch gets its own, since a killed run's port may linger."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def step_losses(out: Path) -> dict[int, float]:
    """Training loss by step from a run's metrics.jsonl (a resumed run drops and relogs what followed its checkpoint)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "eval_loss" not in r}

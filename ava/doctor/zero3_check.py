"""Launch `ava.doctor.zero3_probe` on N ranks and judge it: the active half of `ava doctor`.

The deepspeed launcher starts the ranks exactly as for training. A job that
does not finish within the deadline is killed with its whole process group
and reported as hung, with the launcher's last lines, instead of hanging the
doctor too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ava.doctor.environment import launcher_path
from ava.train.runtime.op_build import use_per_venv_extensions_dir
from ava.train.runtime.rendezvous import free_port

PROBE = Path(__file__).with_name("zero3_probe.py")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool | None  # None: skipped
    summary: str
    detail: str = ""


def run_zero3_probe(ranks: int, accelerator: str, gpus: int, timeout: float) -> ProbeResult:
    """Two ZeRO-3 steps of a tiny MoE on `ranks` local ranks (CPU ranks use gloo)."""
    if accelerator == "cuda" and gpus < ranks:
        return ProbeResult(None, f"skipped: {gpus} GPU(s) visible, the check needs {ranks}",
                           "run `ava doctor --ranks N` with N at most the GPUs of this node")
    launcher = launcher_path()
    if launcher is None:
        return ProbeResult(False, "the deepspeed launcher is not installed", "pip install deepspeed")
    env = {**os.environ}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    use_per_venv_extensions_dir(env)  # the ops build where train.py builds them: the check warms that cache
    with tempfile.TemporaryDirectory(prefix="ava-doctor-") as tmp:
        command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(PROBE), tmp]
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return ProbeResult(False, f"hung: no result within {timeout:.0f} s", _tail(output))
        seconds = time.perf_counter() - started
        reports = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    missing = sorted(set(range(ranks)) - {r["rank"] for r in reports})
    if proc.returncode != 0 or missing:
        return ProbeResult(False, f"failed (exit {proc.returncode}; no result from rank(s) "
                           f"{', '.join(map(str, missing)) or 'none'})", _tail(output))
    losses = {tuple(round(v, 6) for v in r["losses"]) for r in reports}
    if len(losses) != 1:
        return ProbeResult(False, "ranks disagree on the global loss", json.dumps(reports))
    first = reports[0]
    return ProbeResult(True, f"ok: {ranks} ranks ({first['backend']}, {first['device'].split(':')[0]}) ran 2 ZeRO-3 "
                       f"steps of a tiny MoE in {seconds:.0f} s; losses {', '.join(f'{v:.4f}' for v in first['losses'])}")


def _tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])

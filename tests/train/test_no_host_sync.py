"""Between logging steps Ava's training loop never reads a tensor's value: no per-step host sync of its own.

Steps that log read the step's losses once (`mean_over_ranks(...).tolist()` in `ava.train.lm`
and the MoE statistics); the gradient-health gate reads its verdict every step
by design (it decides whether the update applies), so it is off here. The
preemption flag is checked every step, and its read is of the previous
step's agreement (`ava.train.runtime.preemption`), which on a GPU has long arrived.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.train.run_helpers import run_env

WORKER = Path(__file__).with_name("host_sync_worker.py")
TOY = ["--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "512",
       "--max_length", "32", "--batch_size", "2", "--builtin_dataset", "markov", "--warmup_steps", "1",
       "--training.eval_strategy=no", "--training.save_strategy=no", "--training.gradient_health.enabled=false"]


def _reads(steps: int, *overrides: str) -> tuple[int, list[tuple[int, str]]]:
    done = subprocess.run([sys.executable, str(WORKER), str(steps), *TOY, *overrides], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["steps"], [tuple(read) for read in result["reads"]]


def test_steps_that_do_not_log_read_no_tensor_and_logging_steps_read_a_bounded_few() -> None:
    steps, reads = _reads(12, "--logging_steps", "6")
    assert steps == 12
    # Reads made while step s runs are tagged s (the step whose batch was taken last); step 1 builds the engine.
    per_step = {s: [where for step, where in reads if step == s] for s in range(2, 13)}
    # The preemption flag's host copy of the previous step's agreement (`_HostCopy.value`): on a GPU a pinned host
    # tensor, no sync. Any other read in preemption.py (the flag just all-reduced) still counts.
    per_step = {s: [where for where in found if not (where.startswith("preemption.py") and " value " in where)]
                for s, found in per_step.items()}
    quiet = {s: where for s, where in per_step.items() if s not in (6, 12) and where}
    assert not quiet, f"tensor reads in steps that do not log: {quiet}"
    # A logging step: one read of the step's losses and one transfer (.cpu().tolist()) of every MoE statistic,
    # whatever the number of layers and experts.
    assert sorted(where.split(":")[0] for where in per_step[6]) == ["lm.py", "metrics.py", "metrics.py"], per_step[6]

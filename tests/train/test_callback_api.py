"""A user's own callback, through the public Python API: it sees every step, and its state survives a resume.

The script below is what a user writes outside Ava: a `Callback` subclass
that counts the step records it is shown, and `ava.train.run` called from
Python (no command line). The first run is stopped by a signal its own
callback sends (as SLURM would), so it checkpoints and returns "preempted";
the second run, `resume=True`, gets the callback's state back from the
checkpoint before its first step and sees exactly the steps that remain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ava.train.checkpoint.store import latest_complete, read_state
from ava.train.runtime.preemption import REQUEUE_EXIT_CODE
from tests.conftest import REPO
from tests.train.run_helpers import run_env

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import json, os, signal, sys

    from ava.config import ConfigFiles, WorldSize, load_config
    from ava.train import Callback, run


    class StepCounter(Callback):
        """Counts the step records it sees; asks for a stop (SIGUSR1, as a scheduler would) at `stop_at`."""

        name = "step_counter"

        def __init__(self, stop_at=None):
            self.steps, self.stop_at, self.restored = [], stop_at, None

        def on_log(self, trainer, record):
            if "loss" in record:
                self.steps.append(record["step"])
                record["steps_seen"] = len(self.steps)  # a key of its own, for the sinks after it
                if record["step"] == self.stop_at:
                    os.kill(os.getpid(), signal.SIGUSR1)

        def on_step_end(self, trainer, outcome):
            if mode == "stop" and outcome.step == 7:  # the user's own early stop (after the step-6 evaluation)
                trainer.stop("early_stopped", {"step": 7, "event": "early_stop", "reason": "my rule"})

        def state_dict(self):
            return {"steps": list(self.steps)}

        def load_state_dict(self, state):
            self.restored = dict(state)
            self.steps = list(state["steps"])


    mode, out = sys.argv[1], sys.argv[2]
    resolved = load_config(ConfigFiles("configs/gpu/tiny.yaml", "configs/hardware/cpu.yaml"),
                           ["--builtin_dataset", "markov", "--hidden_size", "64", "--num_layers", "2",
                            "--intermediate_size", "128", "--vocab_size", "128", "--max_length", "32",
                            "--batch_size", "4", "--max_steps", "12", "--warmup_steps", "2", "--logging_steps", "1",
                            "--eval_steps", "6", "--save_steps", "100", "--sample_max_new_tokens", "4"],
                           WorldSize(1, "test"))
    counter = StepCounter(stop_at=5 if mode == "first" else None)
    outcome = run(resolved, output_dir=out, resume=mode == "resume", callbacks=[counter])
    print(json.dumps({"status": outcome.status, "exit_code": outcome.exit_code, "steps": counter.steps,
                      "restored": counter.restored, "summary": outcome.summary}))
''')


def _run(script: Path, mode: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(script), mode, str(out)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_users_callback_sees_every_step_keeps_its_state_in_the_checkpoint_and_gets_it_back_on_resume(tmp_path):
    script, out = tmp_path / "my_training.py", tmp_path / "run"
    script.write_text(SCRIPT)

    first = _run(script, "first", out)
    # The signal sent after step 5 is agreed on by every rank at the end of step 6, which is then saved.
    assert first["status"] == "preempted" and first["exit_code"] == REQUEUE_EXIT_CODE
    assert first["steps"] == [1, 2, 3, 4, 5, 6]  # every logged step's record, in order
    tag = latest_complete(out / "checkpoints")
    assert tag == "step00000006"
    state = read_state(out / "checkpoints" / tag / "ava_state_rank0.pt")
    assert state["callbacks"]["step_counter"] == {"steps": [1, 2, 3, 4, 5, 6]}

    resumed = _run(script, "resume", out)
    assert resumed["restored"] == {"steps": [1, 2, 3, 4, 5, 6]}  # given back before the first resumed step
    assert resumed["steps"] == list(range(1, 13))  # then steps 7-12, each once
    assert resumed["status"] == "completed" and resumed["summary"]["status"] == "completed"
    assert resumed["exit_code"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # What the callback added to each record reached metrics.jsonl (the sinks come after the caller's callbacks).
    assert [r["steps_seen"] for r in records if "loss" in r] == list(range(1, 13))


def test_a_stop_a_users_callback_asks_for_still_gets_the_final_checkpoint_and_export(tmp_path):
    script, out = tmp_path / "my_training.py", tmp_path / "run"
    script.write_text(SCRIPT)
    stopped = _run(script, "stop", out)
    summary = stopped["summary"]
    assert stopped["status"] == "early_stopped" and stopped["steps"] == list(range(1, 8))
    assert summary["final_checkpoint"].endswith("step00000007") and summary["checks_passed"], summary["checks"]
    assert summary["checks"]["checkpoint_reloads_exactly"] is True and summary["checks"]["model_exported"] is True

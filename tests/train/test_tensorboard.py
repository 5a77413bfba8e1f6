"""TensorBoard beside W&B: a run's logged numbers as scalars, and a TensorBoard failure never stops training.

Two short real runs (6 steps of a 2-layer model, ~5 s each): one writes
event files whose scalars are read back with TensorBoard's own reader and
compared with metrics.jsonl; in the other every event write raises from the
second record on, and the run still completes. The rest test the pieces alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ava.config import ConfigFiles, WorldSize, load_config
from ava.errors import UserError
from ava.train.callbacks.tensorboard import TensorBoard, log_dir, require_tensorboard
from tests.conftest import REPO
from tests.train.run_helpers import run_env

SCRIPT = textwrap.dedent('''
    import json, sys

    from ava.config import ConfigFiles, WorldSize, load_config
    from ava.train import run

    mode, out = sys.argv[1], sys.argv[2]
    if mode == "raise":  # from the second record on, every event write fails (a full disk, say)
        from torch.utils.tensorboard import SummaryWriter

        calls = []
        def add_scalar(self, tag, value, step):
            calls.append(step)
            if len(set(calls)) > 1:
                raise OSError(28, "No space left on device")
        SummaryWriter.add_scalar = add_scalar
    resolved = load_config(ConfigFiles("configs/gpu/tiny.yaml", "configs/hardware/cpu.yaml"),
                           ["--builtin_dataset", "markov", "--hidden_size", "64", "--num_layers", "2",
                            "--intermediate_size", "128", "--vocab_size", "128", "--max_length", "32",
                            "--batch_size", "4", "--eval_batch_size", "4", "--max_eval_examples", "16",
                            "--max_steps", "6", "--warmup_steps", "2", "--logging_steps", "2", "--eval_steps", "3",
                            "--save_steps", "100", "--sample_max_new_tokens", "0", "--tensorboard_dir", "tb"],
                           WorldSize(1, "test"))
    outcome = run(resolved, output_dir=out)
    print(json.dumps({"status": outcome.status, "exit_code": outcome.exit_code}))
''')


def _run(tmp_path: Path, mode: str) -> tuple[Path, dict, str]:
    script, out = tmp_path / "tb_run.py", tmp_path / "run"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), mode, str(out)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _scalars(directory: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_a_run_writes_every_logged_number_as_a_scalar_with_the_values_of_metrics_jsonl(tmp_path):
    out, result, _ = _run(tmp_path, "ok")
    assert result["status"] == "completed"
    assert list((out / "tb").glob("events.out.tfevents.*")), "no event file under <output_dir>/tb"
    scalars = _scalars(out / "tb")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for key in ("loss", "lm_loss", "lr", "grad_norm", "tokens_per_s"):
        assert scalars[key] == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in steps}, key
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert evals and scalars["eval/loss"] == {s: pytest.approx(v, rel=1e-6) for s, v in evals.items()}
    assert "moe/layer0/load/expert0" in scalars  # the tiny config is MoE: router statistics are there too
    numeric = {k for r in records for k, v in r.items()
               if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
    assert len(scalars) == len(numeric)  # every number of every record, none invented


@pytest.mark.slow
def test_a_tensorboard_that_fails_mid_run_warns_once_and_the_run_completes(tmp_path):
    out, result, stderr = _run(tmp_path, "raise")
    assert result == {"status": "completed", "exit_code": 0}
    assert stderr.count("TensorBoard logging failed") == 1 and "No space left on device" in stderr
    assert json.loads((out / "summary.json").read_text())["checks_passed"]


class _Writer:
    """A SummaryWriter stand-in that records what it is given, and can fail."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.points, self.closed = fail, [], False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.fail:
            raise RuntimeError("event writer thread died")
        self.points.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_only_numbers_are_written_named_as_in_wandb():
    writer = _Writer()
    logger = TensorBoard(writer)
    logger.log({"step": 5, "loss": 2.5, "eval_loss": 2.0, "ok": True, "reason": "text", "none": None})
    assert writer.points == [("loss", 2.5, 5), ("eval/loss", 2.0, 5)]


def test_a_failing_writer_warns_once_then_logging_stops(capsys):
    writer = _Writer(fail=True)
    logger = TensorBoard(writer)
    logger.log({"step": 1, "loss": 1.0})
    logger.log({"step": 2, "loss": 0.5})
    logger.close()
    assert capsys.readouterr().err.count("TensorBoard logging failed (RuntimeError: event writer thread died)") == 1
    assert logger.writer is None and writer.closed


def test_a_directory_that_cannot_be_made_warns_and_returns_none(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert TensorBoard.start(blocker / "tb") is None
    assert "TensorBoard did not start" in capsys.readouterr().err


def test_a_relative_dir_is_under_the_output_dir_and_an_absolute_one_gets_the_run_name(tmp_path):
    out = tmp_path / "outputs" / "tiny-20250101"
    assert log_dir("tensorboard", out) == out / "tensorboard"
    assert log_dir("/shared/tb", out) == Path("/shared/tb/tiny-20250101")


def test_a_missing_tensorboard_package_is_a_user_error_with_the_pip_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` then raises ImportError
    with pytest.raises(UserError) as caught:
        require_tensorboard()
    assert "training.tensorboard_dir" in str(caught.value) and "pip install tensorboard" in caught.value.fix


def test_tensorboard_dir_is_off_by_default_and_set_from_the_command_line():
    files = ConfigFiles(str(REPO / "configs/gpu/tiny.yaml"), str(REPO / "configs/hardware/cpu.yaml"))
    assert load_config(files, [], WorldSize(1, "test")).config.training.tensorboard_dir is None
    resolved = load_config(files, ["--tensorboard_dir", "tb"], WorldSize(1, "test"))
    assert resolved.config.training.tensorboard_dir == "tb"


def test_a_resumed_run_hides_the_events_logged_after_its_checkpoint(tmp_path):
    first = TensorBoard.start(tmp_path / "tb")
    assert first is not None
    for step, loss in ((2, 3.0), (4, 2.5), (6, 2.0), (8, 1.75)):  # died after step 8; the checkpoint is step 4
        first.log({"step": step, "loss": loss})
    first.close()
    resumed = TensorBoard.start(tmp_path / "tb", resumed_at=4)
    assert resumed is not None
    for step, loss in ((6, 1.5), (8, 1.25)):
        resumed.log({"step": step, "loss": loss})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    # without the purge, TensorBoard would draw steps 6 and 8 twice (one event file per attempt)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 3.0), (4, 2.5), (6, 1.5), (8, 1.25)]

"""Ava's per-rank checkpoint state loads with `torch.load(weights_only=True)`: resuming cannot run code.

Pins that the RNG states are saved as plain values and tensors yet restore
exactly, that the monitors' client state survives weights-only loading, and
that a tampered or damaged state file is refused with a user error, without
running what it holds.
"""

from __future__ import annotations

import pickle
import random
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from ava.config.schema.training import GradientHealthConfig
from ava.errors import UserError
from ava.train.callbacks.evaluation import EvalMonitor
from ava.train.checkpoint.store import plain, read_state, rng_state, set_rng_state
from ava.train.engine.gradient_health import HealthMonitor


def _draws() -> tuple[list[float], list[float], float, list[float]]:
    return ([random.random() for _ in range(3)], np.random.rand(3).tolist(), float(np.random.randn()),
            torch.rand(3).tolist())


def _ava_state(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "ava_state_rank0.pt"
    torch.save(plain({"step": 8, "data": {"epoch": 1, "batch_index": 3}, "rng": rng_state(), **extra}), path)
    return path


def test_rng_state_restores_python_numpy_and_torch_exactly_after_a_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state: it must survive too
    path = _ava_state(tmp_path)
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert _draws() == expected


def test_monitor_client_state_with_numpy_scalars_survives_a_weights_only_load(tmp_path):
    monitor = EvalMonitor(patience=3, threshold=0.0)
    monitor.update(4, np.float64(2.5))  # an evaluation loss that arrived as a numpy scalar
    health = HealthMonitor(GradientHealthConfig())
    for step in range(1, 6):
        health.judge(step, np.float32(1.0 + step / 10), loss=np.float64(3.0))
    health._event(6, "gradient_explosion", "test", grad_norm=np.float64(50.0))
    state = read_state(_ava_state(tmp_path, monitor=monitor.state_dict(), health=health.state_dict()))
    restored = HealthMonitor(GradientHealthConfig())
    restored.load_state_dict(state["health"])
    assert restored.state_dict() == plain(health.state_dict())
    again = EvalMonitor(patience=3, threshold=0.0)
    again.load_state_dict(state["monitor"])
    assert (again.best_loss, again.best_step) == (2.5, 4)


def test_plain_converts_numpy_and_deques_and_refuses_what_weights_only_cannot_read():
    out = plain({"a": np.int64(3), "b": deque([np.float32(0.5)]), "c": (np.arange(3),)})
    assert out["a"] == 3 and type(out["a"]) is int and out["b"] == [0.5] and torch.equal(out["c"][0], torch.arange(3))
    with pytest.raises(TypeError, match="Path.*weights_only=True"):
        plain({"where": Path("/tmp")})


class _LeavesEvidence:
    """A pickle that would create `path` when unpickled: what a tampered checkpoint could do with os.system."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_a_state_file_that_would_run_code_is_refused_without_running_it(tmp_path, writer):
    evidence = tmp_path / "evidence"
    path = tmp_path / "ava_state_rank0.pt"
    state = {"step": 1, "data": {}, "rng": _LeavesEvidence(evidence)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(UserError) as info:
        read_state(path)
    assert not evidence.exists(), "unpickling ran the file's code"
    message = str(info.value)
    assert str(path) in message and "corrupt, or the file was not written by Ava" in message
    assert "--resume_from RUN/checkpoints/stepNNNNNNNN" in message and "weights_only=False" not in message


@pytest.mark.parametrize("damage", ["truncated", "empty", "junk", "not-a-dict"])
def test_a_damaged_state_file_is_a_user_error_naming_the_file(tmp_path, damage):
    path = _ava_state(tmp_path)
    data = path.read_bytes()
    if damage == "not-a-dict":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "junk": b"not a checkpoint"}[damage])
    with pytest.raises(UserError, match="earlier complete checkpoint") as info:
        read_state(path)
    assert str(path) in str(info.value)


def test_a_state_file_from_an_older_ava_with_pickled_numpy_state_still_resumes(tmp_path):
    """Runs checkpointed before the weights_only change keep resuming: numpy arrays and scalars are data."""
    path = tmp_path / "ava_state_rank0.pt"
    np.random.seed(7)
    saved = np.random.get_state()
    torch.save({"step": 1, "data": {"position": np.int64(5)}, "rng": {
        "python": random.getstate(), "numpy": saved, "torch": torch.get_rng_state()}}, path)
    expected = np.random.random(3)
    state = read_state(path)
    assert state["data"]["position"] == 5
    set_rng_state(state["rng"])
    assert np.array_equal(np.random.random(3), expected)

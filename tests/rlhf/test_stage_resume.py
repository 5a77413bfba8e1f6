"""Which in-stage checkpoint a resumed RLHF pipeline continues from, and what it forgets of the records.

Fast checks on stage directories laid out by hand, beside the end-to-end
stop-and-resume runs of `test_rlhf_preemption.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ava.errors import UserError
from ava.rlhf.pipeline import _stage_checkpoint, forget_unsaved_records
from ava.train.checkpoint.resume import check_resumable
from ava.train.checkpoint.store import COMPLETE, plain, rng_state


def _checkpoint(stage_dir: Path, step: int, ranks: int = 1, updates: int = 0) -> Path:
    point = stage_dir / "checkpoints" / f"step{step:08d}"
    point.mkdir(parents=True)
    (point / COMPLETE).write_text(f"{step}\n")
    for rank in range(ranks):
        state = {"step": step, "data": {"updaters": [{"role": "actor", "updates": updates}]}, "rng": rng_state(),
                 "callbacks": {}}
        torch.save(plain(state), point / f"ava_state_rank{rank}.pt")
    return point


def _summary(stage_dir: Path, status: str) -> None:
    (stage_dir / "summary.json").write_text(json.dumps({"stage": stage_dir.name, "status": status}))


def test_a_stopped_stage_continues_from_its_checkpoint_and_a_failed_one_starts_over(tmp_path):
    stopped, failed = tmp_path / "ppo", tmp_path / "grpo"
    point = _checkpoint(stopped, 4)
    _summary(stopped, "preempted")
    _checkpoint(failed, 6)
    _summary(failed, "failed")  # continuing would replay the same updates into the same failure
    assert _stage_checkpoint(stopped) == point
    assert _stage_checkpoint(failed) is None
    assert _stage_checkpoint(tmp_path / "sft") is None  # never ran


def test_a_resume_forgets_what_was_logged_past_each_checkpoint_and_keeps_completed_stages(tmp_path):
    (tmp_path / "sft" / "model").mkdir(parents=True)
    _summary(tmp_path / "sft", "completed")
    _checkpoint(tmp_path / "ppo", 4, updates=8)  # killed after step 6, with 12 updates done
    records = [{"stage": "sft", "step": s} for s in (0, 5, 10)]
    records += [{"stage": "ppo", "step": s} for s in range(7)]
    records += [{"stage": "ppo", "event": "nonfinite_gradient", "role": "actor", "step": u, "update": u} for u in (3, 11)]
    records += [{"stage": "grpo", "step": 0}]  # started, no checkpoint: it starts over
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    forget_unsaved_records(metrics, tmp_path, ["sft", "ppo", "grpo"])
    kept = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in kept if r["stage"] == "sft"] == [0, 5, 10]
    assert [r["step"] for r in kept if r["stage"] == "ppo" and "event" not in r] == [0, 1, 2, 3, 4]
    assert [r["update"] for r in kept if "event" in r] == [3]  # update 11 came after the checkpoint's 8
    assert not [r for r in kept if r["stage"] == "grpo"]


def test_a_stage_checkpoint_of_another_number_of_ranks_is_refused_before_it_loads(tmp_path):
    point = _checkpoint(tmp_path / "ppo", 4, ranks=2)
    check_resumable(point, 2, exact=True)
    with pytest.raises(UserError, match="was written by more ranks: it holds the state of 2 rank"):
        check_resumable(point, 1, exact=True)
    with pytest.raises(UserError, match="lacks ava_state_rank2.pt"):
        check_resumable(point, 3, exact=True)

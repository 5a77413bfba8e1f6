"""Pruning never leaves a checkpoint that looks complete but is not, and clears debris of crashed saves."""

from __future__ import annotations

from pathlib import Path

from ava.train.checkpoint.store import BEST, COMPLETE, LATEST, prune


def make(root: Path, step: int, complete: bool = True) -> Path:
    point = root / f"step{step:08d}"
    point.mkdir(parents=True)
    (point / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (point / COMPLETE).write_text(f"{step}\n")
    return point


def test_old_and_incomplete_checkpoints_go_latest_and_best_stay(tmp_path: Path) -> None:
    for step in (1, 2, 3, 5):
        make(tmp_path, step)
    make(tmp_path, 4, complete=False)  # a save that crashed
    (tmp_path / BEST).write_text("step00000001\n")
    (tmp_path / LATEST).write_text("step00000005\n")
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000001", "step00000005"]


def test_a_checkpoint_is_unmarked_before_its_files_are_deleted(tmp_path: Path, monkeypatch) -> None:
    make(tmp_path, 1)
    make(tmp_path, 2)
    (tmp_path / LATEST).write_text("step00000002\n")
    seen: list[bool] = []

    import ava.train.checkpoint.store as checkpoint

    def interrupted_rmtree(path: Path, ignore_errors: bool = False) -> None:
        seen.append((Path(path) / COMPLETE).exists())
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted_rmtree)
    try:
        prune(tmp_path, keep_last=1)
    except KeyboardInterrupt:
        pass
    assert seen == [False]
    assert checkpoint.latest_complete(tmp_path) == "step00000002"

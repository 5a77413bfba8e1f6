"""Faults injected into real training runs: nothing is lost, nothing hangs, every failure says what happened.

- SIGKILL at each of the six points of writing a checkpoint (`SAVE_POINTS`):
  afterwards every checkpoint marked complete loads, `--resume` picks one,
  and the resumed run ends with exactly the losses of an uninterrupted run;
- a full disk while saving (a real 8 MB tmpfs when the tests run as root,
  else an injected ENOSPC): a clear error, the partial checkpoint removed, the
  previous one intact and resumable; a disk full before the run starts too;
- SIGKILL of one rank mid-step under the deepspeed launcher: the other rank
  names the dead one and the job ends well within 60 s, then resumes.

SIGTERM (checkpoint, exit 75, requeue) is covered by tests/train/test_preemption.py,
and injected NaN/spike under each ZeRO stage by tests/train/test_gradient_health_zero.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ava.train.checkpoint.store import COMPLETE, latest_complete, read_state
from ava.train.checkpoint.trust import check_checkpoint
from ava.train.runtime.faults import ENV_VAR, SAVE_POINTS
from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, free_port, run_env, step_losses

STEPS = 5
RUN = [*TINY, *SMALL_RUN, "--hidden_size", "32", "--num_layers", "1", "--max_steps", str(STEPS),
       "--warmup_steps", "1", "--save_steps", "1", "--keep_last_checkpoints", "1", "--logging_steps", "1"]
KILL_STEP = 3


def train(out: Path, *extra: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = run_env() | ({ENV_VAR: fault} if fault else {})
    return subprocess.run([sys.executable, "train.py", *RUN, "--output_dir", str(out), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def loadable_checkpoints(root: Path) -> int:
    """How many checkpoints are marked complete under `root`, after loading each: scan, weights and rank state."""
    complete = [p for p in root.glob("step*") if (p / COMPLETE).is_file()]
    for point in complete:
        check_checkpoint(point, trusted=False)
        weights = torch.load(point / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        assert weights and all(torch.isfinite(t).all() for t in weights.values()), point
        assert read_state(point / "ava_state_rank0.pt")["step"] == int(point.name.removeprefix("step"))
    return len(complete)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return step_losses(out)


@dataclass
class Survival:
    killed: subprocess.CompletedProcess[str]
    resumed_from: str | None
    complete_after_kill: int
    resumed: subprocess.CompletedProcess[str]
    out: Path


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Survival]:
    def one(point: str) -> Survival:
        out = tmp_path_factory.mktemp(point) / "run"
        killed = train(out, fault=f"kill_in_save@{KILL_STEP}/{point}")
        root = out / "checkpoints"
        tag, complete = latest_complete(root), loadable_checkpoints(root)
        resumed = train(out, "--resume")
        return Survival(killed, tag, complete, resumed, out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SAVE_POINTS, pool.map(one, SAVE_POINTS), strict=True))


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_kill_while_saving_loses_nothing(point: str, killed_in_save: dict[str, Survival],
                                           reference: dict[int, float]) -> None:
    s = killed_in_save[point]
    assert s.killed.returncode == -9, s.killed.stderr[-2000:]
    # Before `latest` moves, resume takes the previous checkpoint; after, the new one. Never a partial one.
    expected = KILL_STEP if point in ("after_latest", "during_prune") else KILL_STEP - 1
    assert s.resumed_from == f"step{expected:08d}"
    assert s.complete_after_kill >= 1
    assert s.resumed.returncode == 0, s.resumed.stderr[-3000:]
    assert f"resuming from {s.out / 'checkpoints' / s.resumed_from}" in s.resumed.stdout
    assert step_losses(s.out) == reference, "the resumed run must train exactly as the uninterrupted one"
    leftovers = [p.name for p in (s.out / "checkpoints").glob("step*") if not (p / COMPLETE).is_file()]
    assert leftovers == [], f"debris of the interrupted save was not cleaned up: {leftovers}"


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `where`; the reason it could not be, or None."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def test_a_full_disk_while_saving_is_reported_the_previous_checkpoint_kept_and_the_run_resumes(
        tmp_path: Path, reference: dict[int, float]) -> None:
    """On a real 8 MB tmpfs (root): room for one checkpoint of this model (about 5.6 MB), not for a second.

    Without root the disk cannot be made small, so ENOSPC is injected at the same moment instead; the
    detection of a real one through torch's chained errors is unit-tested in tests/train/test_checkpoint_space.py.
    """
    disk = tmp_path / "disk"
    problem = _mount_tmpfs(disk, "8m")
    real = problem is None
    if not real:
        print(f"NOTE: cannot mount a small tmpfs ({problem}); injecting ENOSPC instead of filling a real disk")
    try:
        if real:
            filler = disk / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=16"], capture_output=True)
            no_room = train(disk / "no_room")  # the disk is full before the run writes anything
            assert no_room.returncode == 2 and "Traceback" not in no_room.stderr, no_room.stderr[-3000:]
            assert "No space left on device" in no_room.stderr and "Fix: free space" in no_room.stderr
            filler.unlink()
        out = disk / "run"
        failing_step = 2 if real else KILL_STEP
        full = train(out, fault=None if real else f"disk_full@{KILL_STEP}")
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
        previous = out / "checkpoints" / f"step{failing_step - 1:08d}"
        assert (f"error (rank 0): could not write checkpoint {out / 'checkpoints' / f'step{failing_step:08d}'}: No "
                f"space left on device; the partial checkpoint was removed and {previous} is intact") in full.stderr
        assert f"Fix: free space on {out / 'checkpoints'}" in full.stderr
        assert not (out / "checkpoints" / f"step{failing_step:08d}").exists()
        assert latest_complete(out / "checkpoints") == previous.name and loadable_checkpoints(out / "checkpoints") == 1
        assert json.loads((out / "summary.json").read_text())["status"] == "failed"
        if real:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = train(out, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert step_losses(out) == reference
    finally:
        if real:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_rank_killed_mid_step_is_named_and_the_job_ends_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launch = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", free_port(),
              "train.py", *RUN, "--num_gpus", "2", "--max_steps", "8", "--save_steps", "2", "--output_dir", str(out)]
    started = time.monotonic()
    # A hang would run into this timeout. Two ranks can take a minute to reach step 5 on a busy machine, so the
    # job's end is timed from the kill (just after checkpoint 4 is written), not from the launch.
    died = subprocess.run(launch, cwd=REPO, env=run_env() | {ENV_VAR: "kill@5:rank1"}, capture_output=True,
                          text=True, timeout=300)
    ended, elapsed = time.time(), time.monotonic() - started
    shown = f"\n--- after {elapsed:.0f} s, exit {died.returncode}\n{died.stdout[-3000:]}\n{died.stderr[-3000:]}"
    assert died.returncode != 0, shown
    text = died.stdout + died.stderr
    assert "error (rank 0): rank 1 (pid " in text and "stopped during training: its process is gone" in text, shown
    assert f"continue with --output_dir {out} --resume (from checkpoints/step00000004)" in text, shown
    assert "Traceback" not in text, shown
    after_kill = ended - (out / "checkpoints" / "step00000004" / COMPLETE).stat().st_mtime
    assert after_kill < 60, f"the job ended {after_kill:.0f} s after the kill{shown}"
    launch[launch.index("--master_port") + 1] = free_port()
    resumed = subprocess.run([*launch, "--resume"], cwd=REPO, env=run_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert sorted(step_losses(out)) == list(range(1, 9))


# --- A full disk on 2 ranks -------------------------------------------------------------------------------------

TWO_RANKS = ["--num_gpus", "2", "--zero_stage", "1"]  # ZeRO-1: each rank writes its own optimizer shard


def train_on_two_ranks(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    launch = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", free_port(),
              "train.py", *RUN, *TWO_RANKS, "--output_dir", str(out), *extra]
    env = run_env() | ({ENV_VAR: fault} if fault else {})
    # A rank left waiting for one that failed would run into this timeout: the job must end on its own.
    return subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("reference_two_ranks") / "run"
    result = train_on_two_ranks(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return step_losses(out)


@pytest.mark.parametrize("who", ["both", "rank1"])
def test_a_full_disk_on_two_ranks_stops_every_rank_keeps_the_previous_checkpoint_and_the_run_resumes(
        tmp_path: Path, reference_two_ranks: dict[int, float], who: str) -> None:
    """Both ranks write into a disk that fills (a real 11 MB tmpfs as root: one ZeRO-1 checkpoint of this
    model, about 7.4 MB, fits, a second does not; else ENOSPC injected on both), or only rank 1's disk
    fills (injected) while rank 0 has written its part and waits for rank 1 at the save's barrier."""
    disk = tmp_path / "disk"
    real = who == "both" and _mount_tmpfs(disk, "11m") is None
    if who == "both" and not real:
        print("NOTE: cannot mount a small tmpfs; injecting ENOSPC on both ranks instead of filling a real disk")
    try:
        out = disk / "run"
        failing_step = 2 if real else KILL_STEP
        full = train_on_two_ranks(out, fault=None if real else f"disk_full@{KILL_STEP}" + (":rank1" if who == "rank1"
                                                                                            else ""))
        text = full.stdout + full.stderr
        shown = f"\n--- exit {full.returncode}\n{full.stdout[-3000:]}\n{full.stderr[-3000:]}"
        assert full.returncode == 2 and "Traceback" not in text, shown
        root = out / "checkpoints"
        partial, previous = root / f"step{failing_step:08d}", root / f"step{failing_step - 1:08d}"
        hit = [rank for rank in (0, 1) if f"error (rank {rank}): rank {rank} could not write its part of checkpoint "
               f"{partial}: No space left on device; the partial checkpoint is incomplete, so resuming ignores it "
               f"(delete it to free its space) and {previous} is intact" in text]
        assert hit == [1] if who == "rank1" else hit, shown
        for rank in {0, 1} - set(hit):  # a rank that did not hit it names one that did, instead of waiting for it
            assert (f"error (rank {rank}): rank {1 - rank} failed: rank {1 - rank} could not write its part of "
                    f"checkpoint {partial}: No space left on device") in text, shown
        assert text.count(f"Fix: free space on {root}") == 2, shown  # one paragraph per rank
        assert not (partial / COMPLETE).exists()  # not trusted: resume ignores it
        assert (root / "latest").read_text().strip() == previous.name
        assert latest_complete(root) == previous.name and loadable_checkpoints(root) == 1
        if not real:
            assert json.loads((out / "summary.json").read_text())["status"] == "failed"
        if real:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = train_on_two_ranks(out, "--resume")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"resuming from {previous}" in resumed.stdout
        assert step_losses(out) == reference_two_ranks
    finally:
        if real:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_barrier_broken_by_another_rank_is_not_blamed_on_this_ranks_disk(tmp_path: Path, monkeypatch) -> None:
    """Rank 0 waits in DeepSpeed's barrier while rank 1 fails; on a full disk the probe would fail too."""
    import errno

    import ava.train.checkpoint.store as store

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "open", full, raising=False)
    broken = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2704")
    assert store._out_of_space(broken, tmp_path) is None
    assert store._out_of_space(RuntimeError("basic_ios::clear: iostream error"), tmp_path) == "No space left on device"

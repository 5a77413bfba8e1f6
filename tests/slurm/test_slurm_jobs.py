"""The shipped launch/slurm/*.sbatch scripts, submitted to a real SLURM (tests/slurm/cluster.py) on CPU ranks.

- train_cpu.sbatch (srun, one task per rank): 2 ranks, on one node or on two, find each other from
  SLURM's variables;
- train.sbatch (one task per node running `deepspeed --no_ssh`): 2 nodes x 1 rank, so each node's
  launcher must get its own node rank;
- preemption: the time-limit warning (USR1 to the batch shell) makes the run checkpoint and the job
  requeue itself; the same job resumes from that checkpoint and completes;
- a job cancelled by the user stays cancelled, although its ranks stop as if preempted;
- a rank that fails ends the step on every node (`srun --kill-on-bad-exit=1`), not only its own task.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.cluster import NODES, SlurmCluster
from tests.train.run_helpers import SMALL_RUN, run_env

pytestmark = pytest.mark.slow

# tests/train/run_helpers.py's small run, on a model small enough that checkpoints are quick.
RUN = [*SMALL_RUN, "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "128",
       "--sample_max_new_tokens", "4"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


@dataclass(frozen=True)
class Launch:
    script: str
    nodes: int
    sbatch_args: list[str]
    settings: dict[str, str]
    ranks: list[tuple[int, int]]  # (rank, local rank)
    run_args: list[str] = field(default_factory=list)


LAUNCHES = {
    "srun-per-rank": Launch("train_cpu.sbatch", 1, [], {"GPUS_PER_NODE": "2"}, [(0, 0), (1, 1)]),
    "srun-2-nodes": Launch("train_cpu.sbatch", 2, ["--ntasks-per-node=1"], {"GPUS_PER_NODE": "1"}, [(0, 0), (1, 0)]),
    # train.sbatch's GPU defaults, on the CPU test nodes: no GPUs, 2 CPUs per node, the CPU config stack.
    "deepspeed-2-nodes": Launch(
        "train.sbatch", 2, ["--gpus-per-node=0", "--cpus-per-task=2"],
        {"GPUS_PER_NODE": "1", "DS_ACCELERATOR": "cpu", "AVA_CONFIG": "configs/gpu/tiny.yaml",
         "AVA_HARDWARE_CONFIG": "configs/hardware/cpu.yaml"},
        [(0, 0), (1, 0)], ["--deepspeed.train_batch_size", "8"]),  # deepspeed_zero2.yaml's 64 is slow here
}


def _submit(cluster: SlurmCluster, tmp_path: Path, launch: Launch, *run: str) -> tuple[str, Path]:
    """sbatch the shipped script from tmp_path (its logs/ land there); returns the job id and the run's output dir."""
    out = tmp_path / "run"
    (tmp_path / "logs").mkdir(exist_ok=True)
    env = {k: v for k, v in {**run_env(), **cluster.env}.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}  # an outer job's stay out
    env.update(AVA_REPO=str(REPO), AVA_PYTHON=sys.executable, AVA_OUTPUT_DIR=str(out),
               AVA_EXTRA_ARGS=" ".join([*RUN, *launch.run_args, *run]))
    env.update(launch.settings)  # a launch's own settings win (a test's AVA_PYTHON, say)
    script = REPO / "launch" / "slurm" / launch.script
    done = subprocess.run(["sbatch", "--parsable", f"--nodes={launch.nodes}", *launch.sbatch_args, str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], out


def _job(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    done = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster.env, capture_output=True,
                          text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def _wait(cluster: SlurmCluster, job_id: str, until: Callable[[dict[str, str]], bool], what: str,
          timeout: float = 300) -> dict[str, str]:
    """Poll the job every 0.5 s (sbatch --wait polls every 32 s) until `until(job)` holds."""
    deadline = time.monotonic() + timeout
    job: dict[str, str] = {}
    while time.monotonic() < deadline:
        job = _job(cluster, job_id)
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: {what} did not happen within {timeout:.0f} s; last seen {job}\n"
                         f"{cluster.log('slurmctld', 1500)}")


def _finished(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    return _wait(cluster, job_id, lambda job: job.get("JobState") in FINISHED, "finishing")


def _wait_for_steps(cluster: SlurmCluster, job_id: str, out: Path, count: int, tmp_path: Path) -> None:
    deadline = time.monotonic() + 300
    while len([r for r in _records(out) if "loss" in r]) < count:
        assert _job(cluster, job_id).get("JobState") not in FINISHED, _log(tmp_path, job_id)[-3000:]
        assert time.monotonic() < deadline, f"the run logged fewer than {count} steps"
        time.sleep(0.2)


def _log(tmp_path: Path, job_id: str) -> str:
    """The job's .out and .err (#SBATCH --output/--error: logs/%x-%j.*, relative to the submit dir)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob(f"*-{job_id}.*")))


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _port(job_id: str) -> int:
    return 10000 + int(job_id) % 20000


@pytest.fixture
def shm_cleanup():
    """DeepSpeed's CPU all-reduce buffers (named by port) outlive ranks that were killed: remove them."""
    ports: list[int] = []
    yield ports
    for port in ports:
        for stale in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            stale.unlink(missing_ok=True)


@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_sbatch_script_trains_two_ranks_to_a_passing_verdict(launch, slurm_cluster, tmp_path, shm_cleanup):
    job_id, out = _submit(slurm_cluster, tmp_path, launch, "--max_steps", "20")
    shm_cleanup.append(_port(job_id))
    job = _finished(slurm_cluster, job_id)
    log = _log(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["steps"] == 20 and summary["checks_passed"] is True
    assert [r["step"] for r in _records(out) if "loss" in r] == [4, 8, 12, 16, 20]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000020"
    # The ranks met at the job's rendezvous: the first node, port 10000 + job id % 20000, which nothing
    # but the job id gives (no MASTER_PORT reaches the job from here).
    for rank, local in launch.ranks:
        assert f"rank {rank}/2 (local {local}) on " in log, log[-3000:]
    assert f"master {NODES[0]}:{_port(job_id)}" in log
    assert job["NumNodes"] == str(launch.nodes)
    assert "training step ended with status 0" in log


PREEMPTED = {name: LAUNCHES[name] for name in ("srun-per-rank", "deepspeed-2-nodes")}


@pytest.mark.parametrize("launch", PREEMPTED.values(), ids=PREEMPTED.keys())
def test_time_limit_warning_checkpoints_requeues_and_the_same_job_resumes(launch, slurm_cluster, tmp_path,
                                                                          shm_cleanup):
    job_id, out = _submit(slurm_cluster, tmp_path, launch, "--max_steps", "100", "--save_steps", "1000",
                          "--eval_steps", "50")
    shm_cleanup.append(_port(job_id))
    _wait_for_steps(slurm_cluster, job_id, out, 2, tmp_path)  # training: past step 8 of 100
    # What `#SBATCH --signal=B:USR1@...` sends ahead of the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_cluster.env, check=True, timeout=30)

    def preempted(job: dict[str, str]) -> bool:
        return (out / "summary.json").exists() and _summary(out)["status"] == "preempted"

    _wait(slurm_cluster, job_id, preempted, "the preempted summary.json")
    summary = _summary(out)
    stopped = summary["steps"]
    tag = f"step{stopped:08d}"
    assert 8 <= stopped < 100 and summary["final_checkpoint"] == str(out / "checkpoints" / tag)
    assert (out / "checkpoints" / "latest").read_text().strip() == tag  # complete: `latest` moves last

    job = _finished(slurm_cluster, job_id)
    log = _log(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert "got SIGUSR1" in log and f"requeueing job {job_id}" in log
    assert f"resuming from {out / 'checkpoints' / tag}" in log  # the requeued run: same job id, same output dir
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["steps"] == 100 and summary["checks_passed"] is True
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(4, 101, 4))  # each step once, both runs
    assert [(r["step"], r["event"]) for r in records if "event" in r] == [(stopped, "preempted")]


def test_cancelled_job_is_not_requeued(slurm_cluster, tmp_path, shm_cleanup):
    """scancel sends SIGTERM, and Ava's ranks stop as if preempted (exit 75): the script must not revive the job."""
    job_id, out = _submit(slurm_cluster, tmp_path, LAUNCHES["srun-per-rank"], "--max_steps", "2000")
    shm_cleanup.append(_port(job_id))
    _wait_for_steps(slurm_cluster, job_id, out, 1, tmp_path)
    subprocess.run(["scancel", job_id], env=slurm_cluster.env, check=True, timeout=30)
    # CANCELLED once the batch script has ended; a requeue would have made the job PENDING with a restart.
    job = _wait(slurm_cluster, job_id, lambda job: job.get("JobState") in FINISHED or job.get("Restarts") != "0",
                "the end of the cancelled job")
    log = _log(tmp_path, job_id)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), log[-3000:]


FAILING = {name: LAUNCHES[name] for name in ("srun-per-rank", "deepspeed-2-nodes")}


@pytest.mark.parametrize("launch", FAILING.values(), ids=FAILING.keys())
def test_a_task_that_fails_ends_the_step_and_the_job_fails_without_requeue(launch, slurm_cluster, tmp_path,
                                                                           shm_cleanup):
    """Task 1 exits 3 at once; task 0 waits for it at the rendezvous, with a 10-minute deadline here. SLURM must
    stop task 0 (TERM, then SIGKILL after KillWait = 30 s) instead of letting the step run out that deadline."""
    python = tmp_path / "python-task1-fails"
    python.write_text(f'#!/bin/bash\nif [ "$SLURM_PROCID" = 1 ]; then echo "injected: task 1 exits 3" >&2; exit 3; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    failing = replace(launch, settings={**launch.settings, "AVA_PYTHON": str(python), "AVA_RENDEZVOUS_TIMEOUT": "600"})
    job_id, out = _submit(slurm_cluster, tmp_path, failing, "--max_steps", "20")
    shm_cleanup.append(_port(job_id))
    job = _wait(slurm_cluster, job_id, lambda job: job.get("JobState") in FINISHED, "the end of the failed step",
                timeout=240)
    log = _log(tmp_path, job_id)
    assert (job["JobState"], job["Restarts"]) == ("FAILED", "0"), log[-3000:]
    assert "injected: task 1 exits 3" in log and "task 1: Exited with exit code 3" in log, log[-3000:]
    assert "could not reach the master" not in log and "requeueing" not in log
    assert re.search(r"training step ended with status [1-9]", log), log[-3000:]
    assert not (out / "summary.json").exists()

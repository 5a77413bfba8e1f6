"""Rank discovery from each launcher's variables, and a rendezvous that fails fast with the reason."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ava.train.runtime.rendezvous import LaunchError, discover, export, first_host, slurm_master_port
from tests.conftest import REPO
from tests.train.run_helpers import TINY, free_port, run_env

DS_LAUNCHER = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
               "CROSS_RANK": "1"}
SLURM_STEP = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
              "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_the_deepspeed_launcher_and_torchrun_variables_are_used_as_given():
    env = discover(DS_LAUNCHER)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3, 8, 1, "10.0.0.1", 29500, "deepspeed launcher")
    assert discover({**DS_LAUNCHER, "TORCHELASTIC_RUN_ID": "x"}).source == "torchrun"


def test_an_srun_step_alone_gives_rank_world_local_rank_and_a_job_derived_master():
    env = discover(SLURM_STEP)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "SLURM srun")
    assert env.master_addr == "gpu07"
    assert env.master_port == slurm_master_port(123456) == 10000 + 123456 % 20000
    assert slurm_master_port(123457) != env.master_port  # concurrent jobs, different ports
    exported: dict[str, str] = {}
    export(env, exported)
    assert exported == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                        "MASTER_PORT": str(env.master_port), "AVA_LAUNCHER": "SLURM srun"}
    assert discover(exported) == env  # read back later in the same process: still from SLURM


def test_the_batch_script_itself_is_not_a_rank_and_no_launcher_is_one_process():
    batch = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
    assert discover(batch).world_size == 1 and discover({}).source == "single process"


@pytest.mark.parametrize(("nodelist", "first"), [("node[03-05,09],gpu1", "node03"), ("single", "single"),
                                                 ("a[1,3]", "a1")])
def test_the_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_an_incomplete_or_malformed_launcher_environment_is_named():
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT not set"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="WORLD_SIZE='two'"):
        discover({**DS_LAUNCHER, "WORLD_SIZE": "two"})


RUN = [*TINY, "--builtin_dataset", "markov", "--max_length", "32", "--batch_size", "2", "--hidden_size", "64",
       "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "128", "--max_steps", "4",
       "--warmup_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"]


def _rank(rank: int, world: int, port: str, out: Path, **extra: str) -> subprocess.Popen:
    env = {**run_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "AVA_RENDEZVOUS_TIMEOUT": "10", **extra}
    return subprocess.Popen([sys.executable, "train.py", *RUN, "--output_dir", str(out / f"rank{rank}")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)  # a guard against a hang, not a speed check
    assert "Traceback" not in err, err[-2000:]
    return proc.returncode, err


@pytest.mark.slow
def test_ranks_started_with_different_world_sizes_stop_with_the_disagreement(tmp_path):
    port = free_port()
    procs = [_rank(0, 2, port, tmp_path), _rank(1, 3, port, tmp_path)]
    (code0, err0), (code1, err1) = (_finish(p) for p in procs)
    assert code0 == code1 == 2
    assert "ranks disagree on the world size: rank 0 has 2, rank 1 has 3" in err0
    assert "went away while rank 1 waited" in err1 or "disagree" in err1


@pytest.mark.slow
def test_a_rank_that_cannot_reach_the_master_stops_and_says_where_it_looked(tmp_path):
    port = free_port()  # nobody listens there: connection refused until the deadline
    code, err = _finish(_rank(1, 2, port, tmp_path, AVA_RENDEZVOUS_TIMEOUT="3"))
    assert code == 2
    assert f"error (rank 1): rank 1 could not reach the master at 127.0.0.1:{port} within 3 s" in err
    assert "MASTER_ADDR" in err and "AVA_RENDEZVOUS_TIMEOUT" in err


@pytest.mark.slow
def test_a_missing_rank_and_a_port_in_use_are_reported_not_waited_on(tmp_path):
    code, err = _finish(_rank(0, 2, free_port(), tmp_path, AVA_RENDEZVOUS_TIMEOUT="3"))
    assert code == 2 and "only 1 of 2 ranks reached the master" in err and "missing: ranks 1" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = _finish(_rank(0, 2, str(busy.getsockname()[1]), tmp_path / "busy"))
    assert code == 2 and "rank 0 could not open the rendezvous" in err and "MASTER_PORT" in err

"""Each rank runs its share of the cores in intra-op threads, whatever OMP_NUM_THREADS asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ava.errors import UserError
from ava.train.runtime.threads import local_ranks, plan_threads, share
from tests.conftest import REPO
from tests.train.run_helpers import free_port, run_env

WORKER = Path(__file__).with_name("threads_worker.py")


@pytest.mark.parametrize("own, node, ranks, expected", [
    (2, 2, 2, 1),     # two ranks on two cores, no binding: one each
    (2, 2, 1, 2),     # one process: all of them
    (64, 64, 8, 8),   # eight GPUs' ranks on a 64-core node
    (8, 64, 8, 8),    # deepspeed --bind_cores_to_rank / srun --cpu-bind: each rank already has its own 8
    (3, 2, 4, 1),     # more ranks than cores: never below one
    (16, 16, 3, 5),   # an uneven split rounds down
])
def test_a_ranks_share_is_its_cores_split_between_the_ranks_that_run_on_them(own, node, ranks, expected):
    assert share(own, node, ranks) == expected


def test_a_request_above_the_share_is_lowered_with_a_note_that_names_the_request_and_the_opt_out():
    plan = plan_threads(2, 2, 2, 2, None, "OMP_NUM_THREADS=2")
    assert (plan.threads, plan.requested) == (1, 2)
    assert plan.note is not None
    assert "each rank runs 1 intra-op thread(s)" in plan.note and "2 ranks on this node share 2" in plan.note
    assert "OMP_NUM_THREADS=2" in plan.note and "AVA_THREADS=keep" in plan.note


@pytest.mark.parametrize("requested, setting, threads", [
    (1, None, 1),      # within the share: left alone, no note
    (8, "keep", 8),    # the user opts out
    (8, "KEEP", 8),
    (8, "3", 3),       # the user chooses
    (2, "auto", 1),
])
def test_a_request_within_the_share_or_an_explicit_setting_is_followed(requested, setting, threads):
    plan = plan_threads(requested, 2, 2, 2, setting)
    assert plan.threads == threads
    assert (plan.note is None) == (setting in (None, "keep", "KEEP") or threads == requested)


@pytest.mark.parametrize("setting", ["two", "0", "-1", "1.5", "99999"])
def test_an_unreadable_setting_is_a_user_error_naming_the_variable(setting):
    with pytest.raises(UserError) as err:
        plan_threads(2, 2, 2, 2, setting)
    assert f"AVA_THREADS={setting.lower()!r}" in err.value.message and "unset AVA_THREADS" in err.value.fix


@pytest.mark.parametrize("environ, ranks", [
    ({}, 1),
    ({"LOCAL_SIZE": "2"}, 2),                                      # the deepspeed launcher
    ({"LOCAL_WORLD_SIZE": "4"}, 4),                                # torchrun
    ({"SLURM_PROCID": "5", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"}, 2),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "8", "SLURM_NODEID": "0"}, 8),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "odd"}, 1),
])
def test_the_ranks_on_this_node_come_from_the_launcher(environ, ranks):
    assert local_ranks(environ) == ranks


def _rank_threads(omp: str) -> tuple[list[dict], str]:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    done = subprocess.run([launcher, "--num_gpus", "2", "--master_port", free_port(), str(WORKER)], cwd=REPO,
                          env={**run_env(), "OMP_NUM_THREADS": omp}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads(line[line.index("{"):]) for line in done.stdout.splitlines() if '"threads"' in line]
    return sorted(ranks, key=lambda r: r["rank"]), done.stdout


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) != 2, reason="the case of the issue: 2 cores")
def test_two_ranks_on_two_cores_under_omp_num_threads_2_run_one_thread_each_and_say_so_once():
    ranks, stdout = _rank_threads("2")
    assert [(r["rank"], r["threads"], r["omp"]) for r in ranks] == [(0, 1, "1"), (1, 1, "1")]
    assert stdout.count("note: each rank runs 1 intra-op thread(s)") == 1

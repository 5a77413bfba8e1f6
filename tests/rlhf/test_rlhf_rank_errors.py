"""An error one rank meets on its own ends every rank within seconds, each naming that rank and its error.

The launched tests run GRPO on 2 CPU ranks under the real `deepspeed`
launcher and make one rank fail: a reward function that raises on that rank
only (a user error: one paragraph, no traceback), or an injected bug
(`AVA_INJECT_FAULTS=error@2:rank1`: its traceback on that rank). The other
rank must say `rank N failed: <the error>` instead of a gloo traceback or a
wait in its collective. The first tests drive `RankWatch` directly on a real
TCP store, without a launcher.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from ava.errors import UserError
from ava.train.runtime.distributed import DONE_KEY, GRACE_S, POLL_S, ProcessInfo, RankFailedError, RankWatch
from ava.train.runtime.faults import ENV_VAR, InjectedError
from ava.train.runtime.lost_rank import LostRankError, Peers
from tests.conftest import REPO
from tests.rlhf.test_rlhf_pipeline import SMALL_MODEL
from tests.train.run_helpers import free_port, run_env

GLOO_LOST_PEER = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                              "[127.0.0.1]:2704. This is typically caused by a remote worker crashing.")
HINT = "continue with --output_dir RUN --resume"


def _two_ranks(peers: Peers | None = None) -> tuple[RankWatch, RankWatch, TCPStore]:
    """Rank 0 and rank 1 of a job, both in this process, sharing a real TCP store (no watch threads)."""
    master = TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    client = TCPStore("127.0.0.1", master.port, 2, is_master=False, wait_for_workers=False,
                      timeout=timedelta(seconds=10))
    here = (socket.gethostname(), os.getpid())
    peers = peers or Peers((here, here))
    return (RankWatch(ProcessInfo(0, 2, 0, master), peers, lambda: HINT),
            RankWatch(ProcessInfo(1, 2, 0, client), peers, lambda: HINT), master)


def test_a_user_error_on_one_rank_is_said_by_that_rank_and_named_by_the_others() -> None:
    rank0, rank1, store = _two_ranks()
    error = UserError("reward function 'my:fn' raised ValueError: boom", "fix my:fn")
    assert rank1.account(error) is error and error.every_rank  # rank 1 says it itself, not only rank 0
    told = rank0.account(GLOO_LOST_PEER)  # rank 0's collective broke when rank 1 left
    assert isinstance(told, RankFailedError) and isinstance(told, LostRankError)
    assert str(told) == "rank 1 failed: reward function 'my:fn' raised ValueError: boom\n  Fix: fix my:fn"
    assert int(store.add(DONE_KEY, 0)) == 2  # both ranks are done with the store: rank 0 may leave


def test_a_bug_on_one_rank_is_named_by_the_others_with_where_to_find_its_traceback() -> None:
    rank0, rank1, _ = _two_ranks()
    bug = InjectedError(f"injected error at step 2 on rank 0 ({ENV_VAR})\nmore lines")
    assert rank0.account(bug) is bug  # its traceback is printed as it is
    told = rank1.account(GLOO_LOST_PEER)
    assert str(told).startswith(f"rank 0 failed: InjectedError: injected error at step 2 on rank 0 ({ENV_VAR})\n")
    assert isinstance(told, UserError) and "rank 0's traceback" in told.fix and told.fix.endswith(HINT)


def test_the_same_user_error_on_every_rank_is_said_once() -> None:
    rank0, rank1, _ = _two_ranks()
    first, second = UserError("bad value", "change it"), UserError("bad value", "change it")
    assert rank1.account(first) is first and first.every_rank
    assert rank0.account(second) is second and not second.every_rank  # rank 1 said it already
    different = UserError("another problem", "change that")
    rank0b, _, _ = _two_ranks()
    assert rank0b.account(different) is different and different.every_rank


def test_a_rank_that_died_without_a_word_is_still_named_as_lost() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rank0, _, _ = _two_ranks(Peers(((socket.gethostname(), os.getpid()), (socket.gethostname(), gone.pid))))
    told = rank0.account(GLOO_LOST_PEER)
    assert isinstance(told, LostRankError) and not isinstance(told, RankFailedError)
    assert str(told).startswith(f"rank 1 (pid {gone.pid} on {socket.gethostname()}) stopped during training")
    assert told.fix.endswith(HINT)


_BLOCKED_RANK = """
import socket, sys, time
from collections.abc import Callable
from datetime import timedelta
from torch.distributed import TCPStore
from ava.train.runtime.distributed import ProcessInfo, RankWatch
from ava.train.runtime.lost_rank import Peers

store = TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False, wait_for_workers=False,
                 timeout=timedelta(seconds=10))
peers = Peers(((socket.gethostname(), int(sys.argv[2])), (socket.gethostname(), 0)))
RankWatch.start(ProcessInfo(1, 2, 0, store), lambda: "resume", peers)
print("watching", flush=True)
time.sleep(300)  # a collective that never returns on its own (NCCL waits for its timeout)
"""


def test_a_rank_blocked_in_a_collective_is_ended_by_its_watch_thread() -> None:
    master = TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    here = (socket.gethostname(), os.getpid())
    rank0 = RankWatch(ProcessInfo(0, 2, 0, master), Peers((here, here)), lambda: HINT)
    blocked = subprocess.Popen([sys.executable, "-c", _BLOCKED_RANK, str(master.port), str(os.getpid())], cwd=REPO,
                               env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert blocked.stdout is not None and blocked.stdout.readline().strip() == "watching"
        rank0.account(UserError("the disk of rank 0 is full", "free space"))
        started = time.monotonic()
        rank0.leave()  # rank 0 serves the store: it stays until rank 1's watch thread has read the failure
        assert int(master.add(DONE_KEY, 0)) == 2
        _, stderr = blocked.communicate(timeout=60)
    finally:
        blocked.kill()
    assert blocked.returncode == 2, stderr
    assert time.monotonic() - started < POLL_S + GRACE_S + 20
    assert "error (rank 1): rank 0 failed: the disk of rank 0 is full\n  Fix: free space" in stderr


# --- the real launcher -------------------------------------------------------------------------------------------

FLAKY_REWARD = """
import os
from pathlib import Path

calls = 0

def reward(prompts, responses, **info):
    global calls
    calls += 1
    if os.environ["RANK"] == os.environ["FAIL_ON_RANK"] and calls == 3:
        Path("failed_at").touch()
        raise ValueError("the reward server is unreachable from this host")
    return [r.count("7") / max(len(r), 1) for r in responses]
"""
GRPO = ["--config", str(REPO / "configs/gpu/tiny.yaml"), "--hardware_config", str(REPO / "configs/hardware/cpu.yaml"),
        "--rlhf_config", str(REPO / "configs/rlhf/test_cpu.yaml"), *SMALL_MODEL, "--num_gpus", "2",
        "--rlhf.stages", "[grpo]", "--rlhf.grpo.init_from", "null", "--rlhf.grpo.steps", "4",
        "--rlhf.grpo.prompts_per_step", "2", "--rlhf.grpo.num_generations", "2", "--rlhf.grpo.mini_batch_size", "4",
        "--rlhf.grpo.ppo_epochs", "1", "--rlhf.grpo.eval_prompts", "2"]
AFTER_FAILURE_S = 180  # a job still running this long after its failure is hanging (gloo would wait 30 minutes)


def _launch(tmp_path: Path, *extra: str, env: dict[str, str], failed: Callable[[str], bool]) -> tuple[int, str, float]:
    """Run GRPO on 2 ranks; its exit code, its output, and the seconds from the failure (once `failed(output so
    far)` holds) to the end of the job."""
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", "2", "--master_port", free_port(), str(REPO / "train_rlhf.py"), *GRPO,
               "--output_dir", str(tmp_path / "run"), *extra]
    log_path = tmp_path / "output.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        failed_at, deadline = None, time.monotonic() + 600
        while proc.poll() is None:
            if failed_at is None and failed(log_path.read_text()):
                failed_at = time.monotonic()
                deadline = failed_at + AFTER_FAILURE_S
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"the job was still running {AFTER_FAILURE_S} s after the failure:\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
    ended = time.monotonic()
    return proc.returncode, log_path.read_text(), ended - (failed_at if failed_at is not None else ended)


@pytest.mark.slow
@pytest.mark.parametrize("failing", [1, 0])
def test_a_reward_function_raising_on_one_rank_ends_every_rank_naming_it(tmp_path: Path, failing: int) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY_REWARD)
    code, text, seconds = _launch(tmp_path, "--rlhf.reward_function", "flaky:reward",
                                  env=run_env() | {"FAIL_ON_RANK": str(failing)},
                                  failed=lambda _: (tmp_path / "failed_at").is_file())
    print(f"rank {failing}'s reward error: every rank ended {seconds:.1f} s after it")
    assert code != 0 and (tmp_path / "failed_at").is_file(), text[-4000:]
    error = "reward function 'flaky:reward' raised ValueError: the reward server is unreachable from this host"
    fix = "  Fix: fix flaky:reward so it returns one number per response"
    assert f"error (rank {failing}): {error}\n{fix}" in text, text[-4000:]  # the failing rank says it itself
    assert f"error (rank {1 - failing}): rank {failing} failed: {error}\n{fix}" in text, text[-4000:]
    assert "Traceback" not in text and "Connection closed" not in text, text[-4000:]


@pytest.mark.slow
def test_a_bug_on_one_rank_ends_every_rank_naming_it(tmp_path: Path) -> None:
    code, text, seconds = _launch(tmp_path, env=run_env() | {ENV_VAR: "error@2:rank1"},
                                  failed=lambda output: "InjectedError" in output)
    print(f"rank 1's bug: every rank ended {seconds:.1f} s after its traceback appeared")
    assert code != 0, text[-4000:]
    bug = f"InjectedError: injected error at step 2 on rank 1 ({ENV_VAR})"
    assert "Traceback" in text and bug in text, text[-4000:]  # rank 1's own traceback
    assert f"error (rank 0): rank 1 failed: {bug}\n  Fix: rank 1's traceback" in text, text[-4000:]
    assert "Connection closed" not in text, text[-4000:]

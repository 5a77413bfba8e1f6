"""Ava's MoE trains under ZeRO-3 with 2 real ranks whose tokens pick different experts.

DeepSpeed's own MoE refuses ZeRO-3, and a naive MoE hangs there when ranks
skip different experts. This runs the real `deepspeed` launcher on 2 CPU
ranks with gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.run_helpers import free_port

WORKER = Path(__file__).with_name("zero3_moe_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_moe_trains_under_zero3_on_two_ranks_with_different_routing(mode, tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(launcher).exists():
        pytest.fail("the deepspeed launcher is not installed next to this Python; run `make setup`")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", free_port(), str(WORKER), mode],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    rows = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("result_rank*.json"))]
    assert proc.returncode == 0 and len(rows) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_rank = {r["rank"]: r for r in rows}
    assert by_rank[0]["leaves"] == by_rank[1]["leaves"] == 2  # both MoE layers are ZeRO-3 leaves
    assert by_rank[0]["load"] != by_rank[1]["load"]  # the ranks really routed differently
    for r in rows:
        assert all(0 < loss < 10 for loss in r["losses"])
    # The optimizer moved the weights, and the full weights gathered from both ranks' shards agree.
    assert abs(by_rank[0]["checksum"] - by_rank[0]["initial"]) > 1e-4
    assert abs(by_rank[0]["checksum"] - by_rank[1]["checksum"]) < 1e-6


"""Each enhanced feature learns under DeepSpeed ZeRO-3 in bf16 on 2 real ranks, with dense and MoE FFNs; all five
at once under ZeRO-1 and ZeRO-2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.run_helpers import free_port

WORKER = Path(__file__).with_name("features_zero3_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(launcher).exists():
        pytest.fail("the deepspeed launcher is not installed next to this Python; run `make setup`")
    out = tmp_path_factory.mktemp("features_zero3")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", free_port(), str(WORKER)],
                          capture_output=True, text=True, env=env, cwd=out, timeout=900)
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("result_rank*.json"))]
    assert proc.returncode == 0 and len(rows) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["rank"]: r["cases"] for r in rows}


CASES = [f"{feature}/{ffn}" for feature in ("moh", "moa", "cross_attention+rag", "episodic_memory")
         for ffn in ("dense", "moe")] + ["all/zero1", "all/zero2"]


@pytest.mark.parametrize("case", CASES)
def test_each_feature_learns_under_zero_bf16_on_two_ranks(results, case):
    for rank in (0, 1):
        r = results[rank][case]
        first, last = sum(r["first"]) / 3, sum(r["last"]) / 3
        assert last < 0.6 * first, (rank, case, r["first"], r["last"])
        assert r["moved"] and all(delta > 0 for delta in r["moved"].values()), (case, r["moved"])
    routed = case.startswith(("moh", "moa", "all")) or case.endswith("/moe")
    assert (results[0][case]["leaves"] > 0) == routed  # routers and MoE layers are gathered whole (marked at any stage)

"""A ZeRO checkpoint resumes on another number of ranks: the same sequences, the same losses.

One global batch of 8 sequences, split as micro 2 x accumulation 4 on one
rank or micro 2 x accumulation 2 x 2 ranks. Each split trains 8 steps from
scratch, checkpointing at steps 4 and 8; then each step-4 checkpoint is
resumed on the other number of ranks (DeepSpeed's universal checkpoint,
converted automatically) and must log the uninterrupted run's losses for
steps 5-8 and its held-out loss, and end at its data position.

Tolerance: relative 1e-5. The two splits add the same per-sequence gradients
in another order (ranks, then micro-batches), so the losses agree to float32
rounding, not bit for bit: measured, they differ by at most 5e-7 on losses
near 4.8 (1e-7 relative). A changed sample, a lost optimizer moment or a
reset LR schedule moves them by 1e-3 or more.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train.run_helpers import TINY, free_port, run_env

TOLERANCE = 1e-5


def _run(stage: str, ranks: int, out: Path, *extra: str) -> str:
    ds = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    launcher = [sys.executable] if ranks == 1 else [ds, "--num_gpus", "2", "--master_port", free_port()]
    command = [*launcher, "train.py", *TINY, "--builtin_dataset", "markov", "--max_length", "64",
               "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "128",
               "--eval_batch_size", "4", "--max_eval_examples", "16", "--warmup_steps", "2", "--logging_steps", "1",
               "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4", "--sample_max_new_tokens", "0",
               "--distributed_config", f"configs/distributed/deepspeed_{stage}.yaml", "--cpu_offload", "false",
               "--batch_size", "2", "--deepspeed.train_batch_size", "8", "--num_gpus", str(ranks),
               "--output_dir", str(out), *extra]
    done = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(out: Path) -> dict[tuple[str, int], float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {("eval" if "eval_loss" in r else "train", r["step"]): r.get("eval_loss", r.get("loss"))
            for r in records if "loss" in r or "eval_loss" in r}


def _data_position(out: Path, step: int) -> dict[str, int]:
    from ava.train.checkpoint.store import read_state

    state = read_state(out / "checkpoints" / f"step{step:08d}" / "ava_state_rank0.pt")
    return {key: state["data"][key] for key in ("epoch", "samples")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_zero_checkpoint_resumes_on_another_number_of_ranks_with_the_same_samples_and_losses(stage, tmp_path):
    one, two = tmp_path / "one-rank", tmp_path / "two-ranks"
    _run(stage, 1, one)
    _run(stage, 2, two)
    full = _losses(two)
    assert sorted(step for kind, step in full if kind == "train") == list(range(1, 9))
    # The two splits of one global batch are the same training: the same sequences each step.
    assert _losses(one) == pytest.approx(full, rel=TOLERANCE)
    assert _data_position(one, 8) == _data_position(two, 8)

    for source, ranks, resumed in ((two, 1, tmp_path / "two-then-one"), (one, 2, tmp_path / "one-then-two")):
        point = source / "checkpoints" / "step00000004"
        stdout = _run(stage, ranks, resumed, "--resume_from", str(point))
        assert f"elastic resume: checkpoint written by {3 - ranks} rank(s)" in stdout
        assert (point / "universal" / "CONVERTED").is_file()  # cached beside the checkpoint
        got = _losses(resumed)
        assert sorted(got) == [("eval", 8), *[("train", s) for s in range(5, 9)]]
        assert got == pytest.approx({key: full[key] for key in got}, rel=TOLERANCE)
        assert _data_position(resumed, 8) == _data_position(two, 8)
        deepspeed = json.loads((resumed / "deepspeed.json").read_text())
        assert (deepspeed["train_batch_size"], deepspeed["gradient_accumulation_steps"]) == (8, 8 // (2 * ranks))


def _checkpoint_of(tmp_path: Path, ranks: int, micro: int, accumulation: int) -> Path:
    """A run directory whose step-4 checkpoint `ranks` ranks wrote (the files counted, not their content)."""
    run = tmp_path / "run"
    point = run / "checkpoints" / "step00000004"
    point.mkdir(parents=True)
    for rank in range(ranks):
        (point / f"ava_state_rank{rank}.pt").write_bytes(b"")
        (point / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (run / "deepspeed.json").write_text(json.dumps({"train_batch_size": micro * accumulation * ranks,
                                                    "train_micro_batch_size_per_gpu": micro,
                                                    "gradient_accumulation_steps": accumulation}))
    return point


def _resolved(ranks: int, *overrides: str):
    from ava.config import ConfigFiles, WorldSize, load_config

    return load_config(ConfigFiles(str(REPO / "configs/gpu/tiny.yaml"), str(REPO / "configs/hardware/cpu.yaml")),
                       list(overrides), WorldSize(ranks, "test"))


def test_on_fewer_ranks_a_derived_global_batch_is_the_checkpoints_with_accumulation_re_derived(tmp_path):
    from ava.train.checkpoint.resume import elastic_batch

    point = _checkpoint_of(tmp_path, ranks=2, micro=2, accumulation=2)
    resolved, note = elastic_batch(_resolved(1, "--batch_size", "2", "--gradient_accumulation_steps", "2"), point)
    b = resolved.batch
    assert (b.micro, b.accumulation, b.global_batch) == (2, 4, 8)  # the micro batch is never the one changed
    assert resolved.config.deepspeed.train_batch_size == 8
    assert note is not None and "written by 2 rank(s) x micro 2 x accumulation 2 = global batch 8" in note


def test_a_global_batch_the_new_rank_count_cannot_split_is_refused_with_valid_choices(tmp_path):
    from ava.errors import UserError
    from ava.train.checkpoint.resume import elastic_batch

    point = _checkpoint_of(tmp_path, ranks=1, micro=3, accumulation=2)  # global 6: micro 3 cannot split it over 4
    with pytest.raises(UserError) as err:
        elastic_batch(_resolved(4, "--batch_size", "3", "--gradient_accumulation_steps", "2"), point)
    assert "cannot make a global batch of 6" in err.value.message
    assert "resume on 1 rank(s)" in err.value.fix


def test_the_same_number_of_ranks_changes_nothing(tmp_path):
    from ava.train.checkpoint.resume import elastic_batch

    point = _checkpoint_of(tmp_path, ranks=2, micro=2, accumulation=2)
    resolved = _resolved(2, "--batch_size", "2", "--gradient_accumulation_steps", "2")
    assert elastic_batch(resolved, point) == (resolved, None)


def test_a_streamed_dataset_is_not_resumed_on_another_number_of_ranks(tmp_path, write_yaml):
    from ava.errors import UserError
    from ava.train.checkpoint.resume import elastic_batch

    point = _checkpoint_of(tmp_path, ranks=2, micro=2, accumulation=2)
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "a"}\n')
    resolved = _resolved(1, "--batch_size", "2", "--data.streaming=true", f"--data.sources=[{{path: {data}}}]")
    with pytest.raises(UserError, match="split between the ranks by document"):
        elastic_batch(resolved, point)


def test_a_lost_rank_state_file_is_a_damaged_checkpoint_not_a_smaller_run(tmp_path):
    from ava.train.checkpoint.elastic import written_ranks

    point = _checkpoint_of(tmp_path, ranks=2, micro=2, accumulation=2)
    (point / "ava_state_rank1.pt").unlink()
    assert written_ranks(point) == 2  # DeepSpeed's shards still say two ranks wrote it

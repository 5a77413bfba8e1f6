"""Resuming a checkpoint on another number of data-parallel ranks (an elastic resume).

ZeRO partitions the optimizer state (stage 1), the gradients (2) and the
parameters (3) by rank, so a checkpoint holds one shard per rank of the run
that wrote it, and DeepSpeed refuses to load it on another world size ("The
checkpoint being loaded used a DP world size of 2 but the current world size
is 1"). DeepSpeed's universal checkpoint is the way across: its converter
(`deepspeed.checkpoint.ds_to_universal`) merges the shards into one file per
parameter (fp32 weights, Adam's moments, the step) that an engine of any
world size slices its own partition from. Ava runs the converter on rank 0
the first time a checkpoint is resumed on another world size and keeps the
result beside the checkpoint's own files, in `<checkpoint>/universal/`
(written to a temporary name and renamed, so a conversion killed midway is
redone, never trusted), so a second elastic resume of the same checkpoint
starts at once; it goes when the checkpoint is pruned.

What Ava keeps per rank (the step, the data position, the callbacks' state,
the RNG states) is the same on every rank except the RNG states: a rank the
checkpoint did not have reads rank 0's file. The data position is in global
samples (`ava.data.batches`), so it is the same on any split of the global
batch; the RNG states only drive dropout (off in the shipped configs), so a
resumed run on another world size is exact up to the order of floating-point
reductions.

A checkpoint whose optimizer state is not partitioned (no ZeRO and no bf16
optimizer: one `mp_rank_00_model_states.pt` holds everything) needs no
conversion: every rank loads it whole.

DeepSpeed internals this relies on (deepspeed 0.19.8): the engine reads its
`_config.load_universal_checkpoint` at load time, so it is set for the one
load that needs it instead of in the run's DeepSpeed config (which the
end-of-run reload of the run's own, non-universal checkpoint also uses).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ava.errors import UserError

UNIVERSAL = "universal"
_DONE = "CONVERTED"


def written_ranks(point: Path) -> int:
    """How many ranks wrote checkpoint `point`: its per-rank Ava state files, or DeepSpeed's per-rank shards when
    they say more (a lost Ava file is then a damaged checkpoint, not a smaller run)."""
    shards = [f for f in point.rglob("*zero_pp_rank_*") if UNIVERSAL not in f.relative_to(point).parts]
    ranks = {int(m.group(1)) for f in shards if (m := _SHARD.search(f.name))}
    ranks |= {int(m.group(1)) for f in point.glob("ava_state_rank*.pt") if (m := _STATE.fullmatch(f.name))}
    return max(ranks) + 1 if ranks else 0


_SHARD = re.compile(r"zero_pp_rank_(\d+)_")
_STATE = re.compile(r"ava_state_rank(\d+)\.pt")


def partitioned(directory: Path) -> bool:
    """Whether the DeepSpeed files in `directory` keep per-rank shards (ZeRO, or the bf16 optimizer)."""
    return any(directory.glob("*optim_states.pt")) or any(directory.glob("zero_pp_rank_*_model_states.pt"))


def universal_copy(directory: Path, converting_rank: bool) -> Path:
    """The universal form of the DeepSpeed checkpoint in `directory`, converted on `converting_rank` if not cached.

    Collective: the other ranks wait at a barrier until the conversion is done.
    """
    import torch.distributed as dist

    target = directory / UNIVERSAL
    failure: str | None = None
    if converting_rank and not (target / _DONE).is_file():
        failure = _convert(directory, target)
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = [failure]
        dist.broadcast_object_list(flag, src=0)
        failure = flag[0]
    if failure is not None:
        raise UserError(
            f"checkpoint {directory} could not be converted for another number of ranks (DeepSpeed's "
            f"ds_to_universal failed: {failure})",
            "resume on the number of ranks the checkpoint was written with, or report the converter's message to "
            "DeepSpeed")
    return target


def _convert(directory: Path, target: Path) -> str | None:
    """Run DeepSpeed's converter into a temporary directory and rename it into place; the failure's last line."""
    temporary = directory / f".{UNIVERSAL}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # a copy without its marker is a conversion that did not finish
    # In a subprocess: the converter starts process pools and prints progress bars, neither of which belongs in
    # a training process. --inject_missing_state: Ava's checkpoints carry no Megatron-style metadata, which the
    # converter asks for only to refuse tensor-parallel merges Ava never has.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(directory),
               "--output_folder", str(temporary), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        shutil.rmtree(temporary, ignore_errors=True)
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {done.returncode}"
    (temporary / _DONE).write_text("ds_to_universal\n")
    os.replace(temporary, target)
    return None


def load_universal(engine: Any, directory: Path) -> None:
    """Load the universal copy in `directory/universal` into `engine` (weights, optimizer and scheduler state)."""
    config = engine._config
    before = config.load_universal_checkpoint
    groups = _inner_param_groups(engine)
    own = _per_group_settings(groups)
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(directory), tag=UNIVERSAL)
    finally:
        config.load_universal_checkpoint = before
    # ZeRO-3's universal load copies the first parameter group's settings into every group (deepspeed 0.19.8,
    # `load_hp_checkpoint_state_from_checkpoint_dir_stage3`: "generally the hyperparameters of each parameter
    # should be the same"), which would decay the norms and biases `training.weight_decay_exclude` exempts.
    for group, settings in zip(groups, own, strict=True):
        group.update(settings)
    # It also gives every group's state the same `step` tensor, which torch's Adam increments in place: once per
    # group and step, so the bias correction would run ahead (step 12 after 8) and the updates drift (1e-3 in the
    # loss within 3 steps). Each group gets its own copy.
    state = getattr(getattr(engine.optimizer, "optimizer", None), "state", None) or {}
    for each in state.values():
        if isinstance(each, dict) and hasattr(each.get("step"), "clone"):
            each["step"] = each["step"].clone()
    if path is None:
        raise UserError(f"DeepSpeed could not load the universal copy of checkpoint {directory}",
                        f"delete {directory / UNIVERSAL} so that it is converted again, and resume")


def _inner_param_groups(engine: Any) -> list[dict[str, Any]]:
    """The parameter groups of the torch optimizer inside DeepSpeed's ZeRO wrapper (or the wrapper's own)."""
    optimizer = engine.optimizer
    return list(getattr(getattr(optimizer, "optimizer", None), "param_groups", None) or optimizer.param_groups)


def _per_group_settings(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each group, the settings that differ between groups (weight decay, say): the run's own choice, kept
    through a load that would flatten them. Settings every group shares (the LR) come from the checkpoint."""
    keys = {key for group in groups for key in group if key != "params"}
    varying = {key for key in keys if len({repr(group.get(key)) for group in groups}) > 1}
    return [{key: group[key] for key in varying if key in group} for group in groups]

"""Where a run resumes from, and the resumes it refuses before anything is written.

`--resume` continues the run in `--output_dir` from its latest complete
checkpoint; `--resume_from` starts a new output directory from any
checkpoint; `--auto_resume` resumes when there is a checkpoint and starts
fresh otherwise (for jobs a scheduler may requeue). Refused, each with the
fix: a changed batch configuration (the data order and LR schedule would
differ), a checkpoint of another number of ranks, a model of another shape,
a damaged or untrusted state file. A changed `max_steps` is not refused: the
data and the held-out set do not depend on it (`ava.data.setup`), and the LR
schedule keeps the decay horizon the checkpoint recorded
(`ava.train.callbacks.lr_horizon`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ava.errors import UserError
from ava.train.checkpoint import store as checkpoint

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def auto_resume(output_dir: str | Path | None, resume: bool, resume_from: str | Path | None) -> bool:
    """--auto_resume: whether `output_dir` holds a complete checkpoint to resume from."""
    if output_dir is None or resume or resume_from:
        raise UserError("--auto_resume needs --output_dir and replaces --resume/--resume_from",
                        "pass --output_dir RUN_DIR --auto_resume, e.g. outputs/$SLURM_JOB_NAME-$SLURM_JOB_ID")
    return checkpoint.latest_complete(Path(output_dir) / "checkpoints") is not None


def resume_point(out_dir: Path, ds_config: dict, ranks: int, *, resume: bool, resume_from: str | Path | None,
                 force: bool = False, trusted: bool = False) -> Path | None:
    """The checkpoint directory to resume from (None: a fresh run), after refusing a changed batch configuration."""
    if resume_from:
        point = Path(resume_from)
        if not (point / checkpoint.COMPLETE).is_file():
            raise UserError(f"--resume_from {point} is not a complete Ava checkpoint (no {checkpoint.COMPLETE})",
                            "point at a checkpoints/stepNNNNNNNN directory written to the end")
        previous_ds = point.parent.parent / "deepspeed.json"
    elif resume:
        tag = checkpoint.latest_complete(out_dir / "checkpoints")
        if tag is None:
            raise UserError(f"{out_dir / 'checkpoints'} holds no complete checkpoint to resume from",
                            "start a new run with a new --output_dir")
        point, previous_ds = out_dir / "checkpoints" / tag, out_dir / "deepspeed.json"
    else:
        return None
    if previous_ds.is_file() and not force:
        before = json.loads(previous_ds.read_text())
        changed = [f"{k}: {before.get(k)} -> {ds_config.get(k)}" for k in BATCH_KEYS if before.get(k) != ds_config.get(k)]
        if changed:
            raise UserError("the batch configuration differs from the checkpoint's (" + "; ".join(changed)
                            + "), so the resumed run would not continue the same training",
                            "resume with the original batch settings and number of ranks, or pass --force_resume")
    check_resumable(point, ranks, trusted=trusted)
    return point


def check_resumable(point: Path, ranks: int, *, trusted: bool = False, exact: bool = False) -> None:
    """Refuse checkpoint `point` before anything loads it: a rank's state missing (or, `exact`, one too many),
    pickles that could run code (unless `trusted`), a state file that cannot be read."""
    missing = [f"ava_state_rank{r}.pt" for r in range(ranks) if not (point / f"ava_state_rank{r}.pt").is_file()]
    written = len(list(point.glob("ava_state_rank*.pt")))
    if missing or (exact and written != ranks):
        what = (f"lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing
                else "was written by more ranks")
        raise UserError(
            f"{point} {what}: it holds the state of {written} rank(s), and this run has {ranks}",
            "resume with the number of ranks the checkpoint was written with; if it had that many, the checkpoint "
            "is damaged: start again from an earlier one (--resume_from CHECKPOINT --output_dir NEW_DIR)")
    from ava.train.checkpoint.trust import check_checkpoint

    check_checkpoint(point, trusted=trusted)
    for rank in range(ranks):  # small files, read safely: a damaged one is found before anything is written
        checkpoint.read_state(point / f"ava_state_rank{rank}.pt")


def refuse_other_model(point: Path, model: Any) -> None:
    """Refuse to resume `point` with a model whose weights have other shapes: DeepSpeed would print pages of them.

    Judged on the parameter shapes of both models built on the meta device, so
    settings that change no weight (rope_theta, activation, top-k...) resume.
    """
    import torch

    from ava.config.pretrained import SHAPE_KEYS
    from ava.model import AvaForCausalLM
    from ava.train.checkpoint.export import run_model_config

    run_dir = point.parent.parent
    if not (run_dir / "config.yaml").is_file():
        return  # a checkpoint without its run directory: DeepSpeed's own check is all there is
    saved = run_model_config(run_dir)
    if saved == model:
        return
    with torch.device("meta"):
        before = {k: tuple(v.shape) for k, v in AvaForCausalLM(saved).state_dict().items()}
        now = {k: tuple(v.shape) for k, v in AvaForCausalLM(model).state_dict().items()}
    if before == now:
        return
    changed = [f"model.{k}: {getattr(saved, k)!r} in the checkpoint, {getattr(model, k)!r} now" for k in SHAPE_KEYS
               if getattr(saved, k) != getattr(model, k)]
    tensors = [f"{k} {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    raise UserError(
        f"checkpoint {point} was written by a model of another shape (" + "; ".join(changed) + "), so its "
        f"weights cannot be loaded into this one ({len(tensors)} tensor(s) differ, e.g. {tensors[0]})",
        f"resume with the model settings recorded in {run_dir / 'config.yaml'}, or start a new run in a new "
        "--output_dir")

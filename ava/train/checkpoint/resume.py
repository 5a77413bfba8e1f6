"""Where a run resumes from, and the resumes it refuses before anything is written.

`--resume` continues the run in `--output_dir` from its latest complete
checkpoint; `--resume_from` starts a new output directory from any
checkpoint; `--auto_resume` resumes when there is a checkpoint and starts
fresh otherwise (for jobs a scheduler may requeue). Refused, each with the
fix: a changed batch configuration (the data order and LR schedule would
differ), a model of another shape, a damaged or untrusted state file. A
changed `max_steps` is not refused: the data and the held-out set do not
depend on it (`ava.data.setup`), and the LR schedule keeps the decay horizon
the checkpoint recorded (`ava.train.callbacks.lr_horizon`).

A checkpoint of another number of ranks resumes (`ava.train.checkpoint.elastic`)
with the global batch it was trained with: when the run's own files leave the
global batch to follow micro x accumulation x ranks, `elastic_batch` asks the
batch solver for the checkpoint's global batch on this many ranks, which
re-derives the gradient accumulation (never the micro batch a file sets), or
stops with the nearest valid combinations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ava.errors import UserError
from ava.train.checkpoint import store as checkpoint

if TYPE_CHECKING:
    from ava.config.loader import ResolvedConfig

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def auto_resume(output_dir: str | Path | None, resume: bool, resume_from: str | Path | None) -> bool:
    """--auto_resume: whether `output_dir` holds a complete checkpoint to resume from."""
    if output_dir is None or resume or resume_from:
        raise UserError("--auto_resume needs --output_dir and replaces --resume/--resume_from",
                        "pass --output_dir RUN_DIR --auto_resume, e.g. outputs/$SLURM_JOB_NAME-$SLURM_JOB_ID")
    return checkpoint.latest_complete(Path(output_dir) / "checkpoints") is not None


def locate(out_dir: Path, *, resume: bool, resume_from: str | Path | None) -> Path | None:
    """The checkpoint directory to resume from (None: a fresh run)."""
    if resume_from:
        point = Path(resume_from)
        if not (point / checkpoint.COMPLETE).is_file():
            raise UserError(f"--resume_from {point} is not a complete Ava checkpoint (no {checkpoint.COMPLETE})",
                            "point at a checkpoints/stepNNNNNNNN directory written to the end")
        return point
    if resume:
        tag = checkpoint.latest_complete(out_dir / "checkpoints")
        if tag is None:
            raise UserError(f"{out_dir / 'checkpoints'} holds no complete checkpoint to resume from",
                            "start a new run with a new --output_dir")
        return out_dir / "checkpoints" / tag
    return None


def _previous_deepspeed(point: Path) -> dict[str, Any] | None:
    """The DeepSpeed config of the run that wrote `point` (its run directory's deepspeed.json), if there."""
    path = point.parent.parent / "deepspeed.json"
    return json.loads(path.read_text()) if path.is_file() else None


def elastic_batch(resolved: ResolvedConfig, point: Path) -> tuple[ResolvedConfig, str | None]:
    """`resolved` with the global batch of checkpoint `point` when it was written by another number of ranks,
    and the note that says so (None: the same number of ranks, nothing to say)."""
    from ava.config.batch import nearest_combinations
    from ava.config.loader import with_accumulation
    from ava.config.provenance import Layer
    from ava.train.checkpoint.elastic import written_ranks

    b, written = resolved.batch, written_ranks(point)
    before = _previous_deepspeed(point)
    if not written or written == b.world.size or before is None:
        return resolved, None
    cfg = resolved.config
    if cfg.data.streaming and cfg.data.sources:
        raise UserError(
            f"checkpoint {point} was written by {written} rank(s) and this run has {b.world.size}, but a streamed "
            "dataset (data.streaming: true) is split between the ranks by document, so its position cannot carry "
            "over to another number of ranks", f"resume on {written} rank(s), or set data.streaming: false")
    if cfg.deepspeed.ep_size > 1 or any(point.glob("layer_*_expert_*_model_states.pt")):
        raise UserError(
            f"checkpoint {point} was written by {written} rank(s) and this run has {b.world.size}, but it (or this "
            "run) places experts on their own ranks (deepspeed.ep_size > 1), whose files DeepSpeed's universal "
            "checkpoint does not convert", f"resume on {written} rank(s) with the same deepspeed.ep_size")
    g = int(before["train_batch_size"])
    was = (f"{written} rank(s) x micro {before.get('train_micro_batch_size_per_gpu')} x accumulation "
           f"{before.get('gradient_accumulation_steps')} = global batch {g}")
    chosen = resolved.origin(("deepspeed", "train_batch_size"))
    if g != b.global_batch and chosen.layer in (Layer.DEFAULT, Layer.DERIVED):
        replanned = with_accumulation(resolved, g, f"the global batch of checkpoint {point}")
        if replanned is None:
            raise UserError(
                f"checkpoint {point} was written by {was}; on {b.world.size} rank(s) micro batch {b.micro} x "
                f"accumulation cannot make a global batch of {g}, so the resumed run would not continue the same "
                "training", "use one of: " + "; ".join(nearest_combinations(b.micro, b.accumulation, g, b.world.size))
                + " (--batch_size M --gradient_accumulation_steps A), or resume on "
                f"{written} rank(s)")
        resolved = replanned
        b = resolved.batch
    return resolved, (f"elastic resume: checkpoint written by {was}; now {b.world.size} rank(s) x micro {b.micro} x "
                      f"accumulation {b.accumulation} = global batch {b.global_batch}; ZeRO state converted to "
                      "DeepSpeed's universal checkpoint (kept in the checkpoint's universal/)")


def check_resume(point: Path, ds_config: dict, ranks: int, *, force: bool = False, trusted: bool = False) -> None:
    """Refuse to resume `point` with another batch configuration (unless `force`) or from damaged files.

    On another number of ranks only the global batch must agree: the micro
    batch and accumulation that split it may differ.
    """
    from ava.train.checkpoint.elastic import written_ranks

    written = written_ranks(point)
    elastic = bool(written) and written != ranks
    before = _previous_deepspeed(point)
    if before is not None and not force:
        keys = BATCH_KEYS[:1] if elastic else BATCH_KEYS
        changed = [f"{k}: {before.get(k)} -> {ds_config.get(k)}" for k in keys if before.get(k) != ds_config.get(k)]
        if changed:
            raise UserError("the batch configuration differs from the checkpoint's (" + "; ".join(changed)
                            + "), so the resumed run would not continue the same training",
                            "resume with the original batch settings, or pass --force_resume")
    check_resumable(point, written if elastic else ranks, trusted=trusted)


def resume_point(out_dir: Path, ds_config: dict, ranks: int, *, resume: bool, resume_from: str | Path | None,
                 force: bool = False, trusted: bool = False) -> Path | None:
    """The checkpoint directory to resume from (None: a fresh run), after refusing a changed batch configuration."""
    point = locate(out_dir, resume=resume, resume_from=resume_from)
    if point is not None:
        check_resume(point, ds_config, ranks, force=force, trusted=trusted)
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

"""Whether a DeepSpeed checkpoint may be unpickled: every pickle in it is read as opcodes first, never run.

DeepSpeed loads its files with `torch.load(weights_only=False)`, i.e. full
unpickling, and a pickle can name any importable callable (`os.system`, say)
and run it while loading. A checkpoint downloaded from elsewhere, or a run
directory someone else could write to, would then run their code as you.

Instead of trusting by location, Ava reads the list of globals each pickle
references (torch's `get_unsafe_globals_in_checkpoint`, an opcode scan that
executes nothing) before DeepSpeed touches the directory. Tensors, containers
and the few plain DeepSpeed classes that ZeRO optimizer states hold
(`ZERO_STATE_GLOBALS`) are what a DeepSpeed checkpoint legitimately needs;
anything else is refused unless the user passes `--trust_checkpoint`, saying
they know where the files came from. The scan also reads every file's zip
directory, so a truncated or corrupt file is reported by name here rather
than as a traceback from inside DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path

from ava.errors import UserError

# Plain data DeepSpeed pickles into ZeRO optimizer states (an enum, a named tuple, the loss scaler's fields):
# building them runs no code beyond their own constructors.
ZERO_STATE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
})

TRUST_FIX = ("if you know where this checkpoint came from and trust it, pass --trust_checkpoint; otherwise do not "
             "load it (a pickle can run any code while it is loaded)")


def unexpected_globals(point: Path) -> dict[Path, list[str]]:
    """Each DeepSpeed file under `point` that references globals beyond tensors and `ZERO_STATE_GLOBALS`."""
    import pickle
    import zipfile

    from torch.serialization import get_unsafe_globals_in_checkpoint

    found: dict[Path, list[str]] = {}
    for file in sorted(point.rglob("*.pt")):  # an RLHF stage keeps one subdirectory per trained engine
        if file.name.startswith("ava_state_rank"):  # Ava's own state: read with weights_only (checkpoint.read_state)
            continue
        try:
            with zipfile.ZipFile(file) as archive:  # reads the central directory only, which a cut file lacks
                archive.namelist()
            names = get_unsafe_globals_in_checkpoint(file)
        except pickle.UnpicklingError as exc:  # a pickle the scanner cannot follow cannot be vouched for
            found[file] = [f"a pickle the safe scanner cannot read ({exc})"]
            continue
        except Exception as exc:  # not a zip, truncated, unreadable: zipfile/torch raise BadZipFile, OSError, ...
            first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
            raise UserError(
                f"checkpoint file {file} is corrupt or truncated ({type(exc).__name__}: {first[:160]})",
                _earlier(point)) from None
        unexpected = sorted(set(names) - ZERO_STATE_GLOBALS)
        if unexpected:
            found[file] = unexpected
    return found


def check_checkpoint(point: Path, trusted: bool) -> None:
    """Refuse checkpoint directory `point` when a file is corrupt or could run code, unless `trusted` (for the latter)."""
    found = unexpected_globals(point)
    if found and not trusted:
        listed = "; ".join(f"{file.relative_to(point)}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                           for file, names in found.items())
        raise UserError(
            f"checkpoint {point} holds pickled objects beyond tensors and DeepSpeed's optimizer state ({listed}); "
            "loading it would run whatever those name", TRUST_FIX)


def _earlier(point: Path) -> str:
    """The fix for a damaged checkpoint: the complete checkpoints beside it, by name."""
    others = sorted(p.name for p in point.parent.glob("step*") if p != point and (p / "COMPLETE").is_file())
    where = f"one of {', '.join(others[-3:])} in {point.parent}" if others else "an earlier checkpoint"
    return (f"restore the file from a copy, or start again from {where} "
            "(--resume_from CHECKPOINT --output_dir NEW_DIR)")

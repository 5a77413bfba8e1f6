"""The `ava` console script.

User errors (`ConfigError`) are printed as one paragraph per problem and exit
with status 2, without a traceback; Ctrl-C exits 130 with one line; anything
else is a bug and keeps its traceback. A user error quotes the values it
rejects, so its message is printed with secrets masked (`ava.secrets`).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any

from ava import __version__
from ava.config import ConfigError
from ava.errors import UserError
from ava.secrets import redact_text, secret_values

USAGE = f"""usage: ava <command> [options]

Ava {__version__} -- DeepSpeed-centric training for GPT-style and MoE models.

commands:
  train                 train (same as `python train.py`)
  rlhf                  RLHF: SFT, reward model, DPO, PPO, GRPO (same as `python train_rlhf.py`)
  config show           print the resolved configuration (--explain: with origins)
  config explain KEY    where a key's value came from, and every layer that set it
  config validate       validate a config stack, or every shipped combination
  config deepspeed      print the generated DeepSpeed JSON
  config diff A B       compare two configs resolved with the same other layers
  config schema         print the JSON Schema of config files (for editors)
  model summary         parameters (total, active, per component) and FLOPs per token
  model import-hf SRC   convert a local HF Llama/Mixtral/GPT-2 checkpoint to an Ava model
  model export-hf SRC   write an Ava model as a HF checkpoint (from_pretrained loads it)
  model export-checkpoint RUN
                        consolidate a training checkpoint (any ZeRO stage) to safetensors / HF
  generate PATH         continue a prompt with a trained model (a run, model, checkpoint or HF directory)
  rag build-index       build the retrieval datastore (RETRO chunks, embeddings, index) of a config's training data
  launch slurm          render the SLURM batch script for a config (--submit: submit it with sbatch)
  doctor                check this machine: versions, accelerator, precisions, and a 2-rank ZeRO-3 start

`ava <command> --help` describes each command's options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        _error(exc.render())
        return 2
    except UserError as exc:
        _error(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if _out_of_space(exc):
            return 2
        raise


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"ava {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "train":
        return _command("train_cmd").main(rest, prog="ava train")
    if command == "rlhf":
        return _command("rlhf_cmd").main(rest, prog="ava rlhf")
    if command == "doctor":
        return _command("doctor_cmd").main(rest)
    if command == "generate":
        return _command("generate_cmd").main(rest)
    groups = ("config", "model", "rag", "launch")
    if command in groups:
        table: Mapping[str, Callable[[Sequence[str]], int]] = _command(f"{command}_cmd").COMMANDS
        if not rest or rest[0] in ("-h", "--help"):
            print(USAGE)
            return 0 if rest else 2
        if rest[0] not in table:
            return _unknown(f"{command} {rest[0]}", [f"{command} {c}" for c in table])
        return table[rest[0]](rest[1:])
    return _unknown(command, ["train", "rlhf", *groups, "generate", "doctor"])


def _out_of_space(exc: OSError) -> bool:
    """A full disk or quota: the user's to fix, so one paragraph and exit 2, not a traceback."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return False
    where = f"{exc.filename}: " if exc.filename else ""
    _error(f"error: {where}{exc.strerror}\n  Fix: free space on that disk (or point --output_dir at another), "
           "then run again; a run that had saved a checkpoint continues with --output_dir RUN --resume")
    return True


def _error(message: str) -> None:
    """Print a user error on stderr with secrets masked: it may quote a key the user pasted."""
    print(redact_text(message, secret_values()), file=sys.stderr)


def _command(module: str) -> Any:
    """Import one command's module on demand: `ava config ...` need not import torch and DeepSpeed."""
    return import_module(f"ava.cli.{module}")


def _leave(status: int) -> int:
    """End a launched rank with `status` at once, once its outputs are written and its process group is gone.

    Under a multi-process launcher, C++ threads that DeepSpeed and gloo leave
    behind can abort the interpreter's teardown ("terminate called without an
    active exception", exit -6) after the run has fully succeeded, and the
    launcher then reports the whole job failed. Everything the run promised is
    on disk by now, so the teardown has nothing left to do.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _unknown(command: str, options: list[str]) -> int:
    import difflib

    close = difflib.get_close_matches(command, options, n=1)
    hint = f" Did you mean `ava {close[0]}`?" if close else ""
    fix = f"run `ava {close[0]}`" if close else "pick one of: " + ", ".join(f"`ava {o}`" for o in options)
    print(f"ava: unknown command `{command}`.{hint} Run `ava --help` for the list.\n  Fix: {fix}", file=sys.stderr)
    return 2


def train_entry(argv: Sequence[str] | None = None) -> int:
    """Entry used by train.py: the same error handling as `ava`."""
    return _entry(_command("train_cmd").main, argv)


def rlhf_entry(argv: Sequence[str] | None = None) -> int:
    """Entry used by train_rlhf.py: the same error handling as `ava`."""
    return _entry(_command("rlhf_cmd").main, argv)


def _entry(command: Callable[[Sequence[str]], int], argv: Sequence[str] | None) -> int:
    """Run a launched entry point: errors as one message from rank 0 (a launch problem from every rank)."""
    try:
        return _leave(command(list(sys.argv[1:] if argv is None else argv)))
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":
            _error(exc.render())
        return 2
    except UserError as exc:
        from ava.train.runtime.rendezvous import LaunchError

        rank = os.environ.get("RANK", "0")
        if isinstance(exc, LaunchError) or getattr(exc, "every_rank", False):  # each rank meets its own: all say it
            _error(f"error (rank {rank}): {exc}")
        elif rank == "0":
            _error(f"error: {exc}")
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops after a checkpoint): one line, no traceback
        if os.environ.get("RANK", "0") == "0":
            print("interrupted", file=sys.stderr)
        return _leave(130)
    except OSError as exc:
        if _out_of_space(exc):
            return 2
        raise

"""The command-line arguments every entry point shares.

`--config`, `--hardware_config`, `--distributed_config`, `--rlhf_config`, the
launcher's `--local_rank`, `--num_gpus` and `--num_nodes`, and any number of
`--key value` overrides.  Abbreviations are disabled so `--conf` is never
silently taken for `--config`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ava.config import ConfigFiles, WorldSize, load_config
from ava.config.loader import ResolvedConfig
from ava.errors import UserError
from ava.secrets import redact_text, secret_values

OVERRIDE_HELP = """\
overrides:
  --KEY VALUE           a flat key of one section, e.g. --batch_size 32 --learning_rate 5e-5
  --SECTION.KEY VALUE   any key, e.g. --training.learning_rate 5e-5 --model.num_experts=8
  --KEY null            reset a key to its default
"""


class _OnceOnly(argparse.Action):
    """A config-file flag given twice is a user error: argparse would keep the last and drop the first silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None)
        if before is not None:
            raise UserError(f"{option_string} given twice ({before} and {values}); one file per layer is read, "
                            "so the first would be ignored",
                            f"pass {option_string} once; to combine two files, put one's settings in a layer of its "
                            "own (--hardware_config, --distributed_config) or as --KEY VALUE overrides")
        setattr(namespace, self.dest, values)


def add_stack_arguments(parser: argparse.ArgumentParser, *, require_config: bool = False) -> None:
    """Add the config-file and launcher arguments."""
    group = parser.add_argument_group("configuration (merged in this order; later wins)")
    group.add_argument("--config", action=_OnceOnly, required=require_config,
                       help="base config, e.g. configs/gpu/tiny.yaml")
    group.add_argument("--hardware_config", action=_OnceOnly, help="hardware config, e.g. configs/hardware/cpu.yaml")
    group.add_argument("--distributed_config", action=_OnceOnly,
                       help="distributed config, e.g. configs/distributed/deepspeed_zero2.yaml")
    group.add_argument("--rlhf_config", action=_OnceOnly, help="RLHF config, e.g. configs/rlhf/test_cpu.yaml")
    launch = parser.add_argument_group("launcher (accepted from deepspeed/torchrun; a dry run uses them for the world size)")
    launch.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    launch.add_argument("--num_gpus", type=int, default=None, help="GPUs per node (dry run: world size)")
    launch.add_argument("--num_nodes", type=int, default=None, help="nodes (dry run: world size)")


@dataclass(frozen=True)
class Stack:
    """Everything needed to load one configuration."""

    files: ConfigFiles
    overrides: tuple[str, ...]
    world: WorldSize


def stack_from(ns: argparse.Namespace, extras: Sequence[str]) -> Stack:
    files = ConfigFiles(ns.config, ns.hardware_config, ns.distributed_config, ns.rlhf_config)
    world = WorldSize.detect(num_gpus=ns.num_gpus, num_nodes=ns.num_nodes)
    return Stack(files, tuple(_without_local_rank(extras)), world)


def resolve_stack(ns: argparse.Namespace, extras: Sequence[str]) -> ResolvedConfig:
    """Load and validate the config stack as a launched rank sees it; rank 0 prints the notices.

    Inside an `srun` step SLURM's variables are turned into the launcher's first,
    so the batch plan sees the real world size.
    """
    import os
    import sys

    from ava.train.runtime.rendezvous import discover, export

    launch = discover(os.environ)
    if launch.source == "SLURM srun":  # before the config reads the world size from WORLD_SIZE
        export(launch, os.environ)
    stack = stack_from(ns, extras)
    resolved = load_config(stack.files, stack.overrides, stack.world)
    if os.environ.get("RANK", "0") == "0":
        for notice in resolved.notices:
            print(redact_text(notice.render(), secret_values()), file=sys.stderr)
    return resolved


def _without_local_rank(extras: Sequence[str]) -> list[str]:
    # The deepspeed launcher may pass `--local_rank=N` in forms argparse already took;
    # anything left that is a launcher flag is dropped here, not treated as an override.
    out: list[str] = []
    skip = False
    for token in extras:
        if skip:
            skip = False
            continue
        if token.startswith("--local_rank") or token.startswith("--local-rank"):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                   epilog=OVERRIDE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)

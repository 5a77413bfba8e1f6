"""`python train.py`, `deepspeed train.py` and `ava train`: resolve the config and report it.

The training engine is not part of this version: the command validates the
full stack exactly as a run would and prints the resolved configuration, the
batch plan and the DeepSpeed JSON, which is the guide's "validate before long
runs" step.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from ava.cli.args import add_stack_arguments, new_parser, stack_from
from ava.cli.render import render_yaml
from ava.config import build_deepspeed_config, load_config


def main(argv: Sequence[str], prog: str = "train.py") -> int:
    parser = new_parser(prog, "Train an Ava model (this version validates and prints the configuration).")
    add_stack_arguments(parser, require_config=True)
    ns, extras = parser.parse_known_args(argv)
    stack = stack_from(ns, extras)
    resolved = load_config(stack.files, stack.overrides, stack.world)
    if os.environ.get("RANK", "0") != "0":
        return 0  # only rank 0 reports
    for notice in resolved.notices:
        print(notice.render(), file=sys.stderr)
    cfg, b = resolved.config, resolved.batch
    print("# resolved configuration (each value with its origin)")
    sys.stdout.write(render_yaml(resolved, with_origins=True))
    print("\n# DeepSpeed config generated from it")
    print(json.dumps(build_deepspeed_config(cfg), indent=2))
    tokens = b.tokens_per_step(cfg.data.max_length)
    print(f"\nconfig OK: micro batch {b.micro} x accumulation {b.accumulation} x {b.world.size} rank(s) "
          f"= {b.global_batch} sequences = {tokens:,} tokens per optimizer step "
          f"[{b.world.source}]; precision {cfg.training.mixed_precision}; ZeRO stage {cfg.deepspeed.zero_stage}")
    from ava.model.summary import summarise_config

    m = summarise_config(cfg.model, cfg.data.max_length)
    print(f"model: {m.total:,} parameters ({m.active_per_token:,} active per token), "
          f"{m.training_flops_per_token / 1e6:,.1f} MFLOP per training token (`ava model summary` for details)")
    print("the training engine is not part of this version of Ava; the configuration above is what a run would use")
    return 0

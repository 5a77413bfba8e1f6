"""`python train.py`, `deepspeed train.py` and `ava train`: parse the flags, run, exit with the run's status.

The run itself is `ava.train.run` (also the Python API). `--dry_run` only
validates the stack exactly as a run would and prints the resolved
configuration, the batch plan and the DeepSpeed JSON: the guide's "validate
before long runs" step.

A run writes checkpoints under `<output_dir>/checkpoints/`; `--resume`
continues the run in `--output_dir` from its latest complete checkpoint and
`--resume_from` starts a new output directory from any checkpoint. An output
directory that already holds files is otherwise never reused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ava.cli.args import add_stack_arguments, new_parser, resolve_stack
from ava.config import build_deepspeed_config
from ava.config.loader import ResolvedConfig
from ava.config.render import render_yaml


def main(argv: Sequence[str], prog: str = "train.py") -> int:
    parser = new_parser(prog, "Train an Ava model under DeepSpeed.")
    add_stack_arguments(parser, require_config=True)
    parser.add_argument("--dry_run", action="store_true",
                        help="validate and print the resolved configuration and DeepSpeed JSON; do not train")
    parser.add_argument("--output_dir", default=None,
                        help="where the run writes its outputs (default: outputs/<config name>-<date_time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output_dir from its latest complete checkpoint")
    parser.add_argument("--resume_from", default=None,
                        help="start from this checkpoint directory (e.g. RUN/checkpoints/step00001000)")
    parser.add_argument("--force_resume", action="store_true",
                        help="resume even though the batch configuration differs from the checkpoint's")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="resume from a checkpoint even though its pickles reference objects beyond tensors and "
                        "DeepSpeed's optimizer state (they could run code while loading); only for checkpoints you "
                        "trust")
    parser.add_argument("--auto_resume", action="store_true",
                        help="resume from --output_dir's latest complete checkpoint if it has one, else start a "
                             "new run there (for jobs a scheduler may requeue)")
    from ava.train.runtime.preemption import PreemptionFlag

    # First thing: a scheduler's stop signal (or a first Ctrl-C) during start-up must not kill the process outright.
    with PreemptionFlag() as preemption:
        return _main(parser, argv, preemption)


def _main(parser: Any, argv: Sequence[str], preemption: Any) -> int:
    ns, extras = parser.parse_known_args(argv)
    resolved = resolve_stack(ns, extras)
    main_rank = os.environ.get("RANK", "0") == "0"
    if ns.dry_run:
        from ava.train.inputs.init_from import pretrained_for_run

        resolved, pretrained = pretrained_for_run(resolved, None)
        if main_rank:
            _print_plan(resolved, pretrained)
        return 0
    from ava.train.runtime.op_build import prepare_op_builds

    prepare_op_builds()  # before DeepSpeed builds an op: this venv's cache, no silent wait on a stale lock
    from ava.train.runner import run

    outcome = run(resolved, output_dir=ns.output_dir, resume=ns.resume, resume_from=ns.resume_from,
                  auto_resume=ns.auto_resume, force_resume=ns.force_resume, trust_checkpoint=ns.trust_checkpoint,
                  preemption=preemption)
    return outcome.exit_code


def _print_plan(resolved: ResolvedConfig, pretrained: Any = None) -> None:
    cfg, b = resolved.config, resolved.batch
    print("# resolved configuration (each value with its origin)")
    sys.stdout.write(render_yaml(resolved, with_origins=True))
    print("\n# DeepSpeed config generated from it")
    print(json.dumps(build_deepspeed_config(cfg), indent=2))
    tokens = b.tokens_per_step(cfg.data.max_length)
    print(f"\nconfig OK: micro batch {b.micro} x accumulation {b.accumulation} x {b.world.size} rank(s) "
          f"= {b.global_batch} sequences = {tokens:,} tokens per optimizer step "
          f"[{b.world.source}]; precision {cfg.training.mixed_precision}; ZeRO stage {cfg.deepspeed.zero_stage}")
    from ava.cli.stack_report import memory_verdict, model_shape_notice
    from ava.model.summary import summarise_config

    m = summarise_config(cfg.model, cfg.data.max_length)
    print(f"model: {m.total:,} parameters ({m.active_per_token:,} active per token), "
          f"{m.training_flops_per_token / 1e6:,.1f} MFLOP per training token (`ava model summary` for details)")
    for line in model_shape_notice(resolved, with_parameters=True):
        print(f"note: {line}")
    memory = memory_verdict(resolved)
    print("\n".join(memory.table()))
    if memory.warning():
        print(f"WARNING: {memory.warning()}")
    if pretrained is not None:
        print(f"init_from: weights and architecture from {pretrained.describe()}")
    import torch

    from ava.model import AvaForCausalLM
    from ava.model.lora import prepare_trainable

    with torch.device("meta"):  # shapes only: a dry run of a large model allocates nothing
        _, report, warnings = prepare_trainable(AvaForCausalLM(cfg.model), cfg.training.lora,
                                                from_scratch=cfg.training.init_from is None)
    print(report.line())
    for warning in warnings:
        print(f"WARNING: {warning}")



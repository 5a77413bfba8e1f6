"""`python train_rlhf.py` and `ava rlhf`: parse the flags, run the RLHF pipeline, exit with its status.

The pipeline is `ava.rlhf.runner.run` (also the Python API): SFT, reward
model, DPO, PPO and GRPO stages in one output directory. `--resume`
continues a pipeline from the first stage that did not complete, inside it
when it left a checkpoint; a stop signal (SIGTERM, SIGUSR1) checkpoints the
running stage and exits 75 for the scheduler to requeue.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ava.cli.args import add_stack_arguments, new_parser, resolve_stack
from ava.config.render import render_yaml
from ava.errors import UserError


def main(argv: Sequence[str], prog: str = "train_rlhf.py") -> int:
    parser = new_parser(prog, "RLHF fine-tuning on the Ava engine: SFT, reward model, DPO, PPO and GRPO.")
    add_stack_arguments(parser, require_config=True)
    parser.add_argument("--dry_run", action="store_true", help="validate and print the resolved configuration only")
    parser.add_argument("--output_dir", default=None,
                        help="where the pipeline writes (default: outputs/rlhf-<config name>-<date_time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the pipeline in --output_dir from the first stage that did not complete "
                             "(inside it, from its latest checkpoint, when it wrote one)")
    parser.add_argument("--auto_resume", action="store_true",
                        help="resume the pipeline in --output_dir if one was started there, else start it there "
                             "(for jobs a scheduler may requeue)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="resume a stage from a checkpoint even though its pickles reference objects beyond "
                             "tensors and DeepSpeed's optimizer state (they could run code while loading); only for "
                             "checkpoints you trust")
    from ava.train.runtime.preemption import PreemptionFlag

    # First thing: a scheduler's stop signal during start-up must not kill the process outright.
    with PreemptionFlag() as preemption:
        ns, extras = parser.parse_known_args(argv)
        if ns.rlhf_config is None:
            raise UserError("--rlhf_config is required: it says which RLHF stages to run",
                            "add --rlhf_config configs/rlhf/test_cpu.yaml (or your own)")
        resolved = resolve_stack(ns, extras)
        if ns.dry_run:
            if os.environ.get("RANK", "0") == "0":
                sys.stdout.write(render_yaml(resolved, with_origins=True))
                print(f"\nconfig OK: RLHF stages {', '.join(resolved.config.rlhf.stages)}")  # type: ignore[union-attr]
            return 0
        from ava.train.runtime.op_build import prepare_op_builds

        prepare_op_builds()  # before DeepSpeed builds an op: this venv's cache, no silent wait on a stale lock
        from ava.rlhf.runner import run

        outcome = run(resolved, output_dir=ns.output_dir, resume=ns.resume, auto_resume=ns.auto_resume,
                      trust_checkpoint=ns.trust_checkpoint, preemption=preemption)
        return outcome.exit_code

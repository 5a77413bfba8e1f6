"""`ava launch slurm`: the SLURM batch script for a config, printed or submitted.

The config stack is validated first, exactly as train.py will load it in the
job, with the job's world size (nodes x GPUs per node): a config that cannot
run fails here with the usual configuration error, before anything is queued.
The script is the shipped template (`launch/slurm/train.sbatch`, or with
`--srun` `train_srun.sbatch`) with the requested `#SBATCH` lines and the run's
variables filled in (`ava.launch.sbatch`). Without `--submit` it is printed
and nothing else happens; with `--submit` it is written to a file and handed
to `sbatch`, which runs from the Ava checkout (the job script starts from
its submit directory: it sources launch/slurm/run_step.sh and runs train.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from ava.cli.args import add_stack_arguments
from ava.config import ConfigFiles, WorldSize, load_config
from ava.config.loader import ResolvedConfig
from ava.launch.sbatch import (
    VARIABLES,
    JobRequest,
    SbatchError,
    find_sbatch,
    output_dirs,
    read_template,
    render,
    submit,
    template_path,
)

CHECKOUT = Path(__file__).resolve().parents[2]  # holds train.py and launch/slurm/
# train.py's own options (beside the config stack and overrides) that may follow `--`.
TRAIN_SWITCHES = ("--auto_resume", "--force_resume", "--dry_run")
# Set by the job script; after `--` they would contradict it. (The script always passes
# --auto_resume, which train.py refuses beside --resume/--resume_from.)
SET_BY_SCRIPT = {"config": "--config", "hardware_config": "--hardware_config",
                 "distributed_config": "--distributed_config", "output_dir": "--output_dir",
                 "num_gpus": "--gpus_per_node", "num_nodes": "--nodes", "resume": "",
                 "resume_from": ""}


def _checked(pattern: str, what: str, example: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what} (e.g. {example})")
        return value

    return check


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


SLURM_TIME = _checked(r"(\d+-)?\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE|unlimited|infinite",
                      "a SLURM time limit", "02:00:00, 90, 1-12:00:00")
SLURM_MEM = _checked(r"\d+[KMGTkmgt]?", "a SLURM memory size", "64G, 512000M, 0 for all of the node's memory")
SLURM_NAME = _checked(r"[A-Za-z0-9_.+-]+", "a name without spaces or shell characters", "ava-base")
SLURM_PARTITIONS = _checked(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "a partition name or comma-separated list", "gpu")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ava launch slurm", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render the SLURM batch script that trains this config on NODES x GPUS_PER_NODE GPUs and\n"
                    "print it (nothing is submitted), or with --submit write it and submit it with sbatch.\n"
                    "The config stack is validated first, for that world size.",
        epilog="train.py arguments after `--` (config overrides) are validated with the stack\n"
               "and passed to every rank, e.g.  -- --max_steps 20000 --learning_rate 3e-4")
    group = parser.add_argument_group("configuration (as for train.py)")
    group.add_argument("--config", required=True, help="base config, e.g. configs/gpu/base.yaml")
    group.add_argument("--hardware_config", help="hardware preset, e.g. configs/hardware/h100_80gb.yaml "
                                                 "(per-GPU micro batch, precision, ZeRO stage)")
    group.add_argument("--distributed_config", help="distributed config, e.g. configs/distributed/deepspeed_zero2.yaml")
    job = parser.add_argument_group("job")
    job.add_argument("--nodes", type=_positive, required=True, help="number of nodes")
    job.add_argument("--gpus_per_node", type=_positive, required=True, help="GPUs per node")
    job.add_argument("--partition", type=SLURM_PARTITIONS, help="SLURM partition (default: the template's)")
    job.add_argument("--time", type=SLURM_TIME, help="time limit, e.g. 24:00:00 (default: the template's)")
    job.add_argument("--cpus_per_task", type=_positive,
                     help="CPUs per task: per node (one launcher task each), with --srun per GPU (default: the template's)")
    job.add_argument("--mem", type=SLURM_MEM, help="memory per node, e.g. 0 (all) or 480G (default: the template's)")
    job.add_argument("--job_name", type=SLURM_NAME, help="job name (default: ava-<config name>)")
    job.add_argument("--output_dir", help="the run's output directory (default: the template's, per job)")
    job.add_argument("--python", help="Python on the compute nodes (default: the template's, `python` on the "
                                      "job's PATH, which sbatch copies from this shell)")
    job.add_argument("--srun", action="store_true",
                     help="one srun task per GPU (launch/slurm/train_srun.sbatch) instead of one deepspeed "
                          "launcher per node (launch/slurm/train.sbatch)")
    job.add_argument("--template", type=Path, help="render this template instead of the shipped one")
    job.add_argument("--submit", action="store_true", help="write the script and submit it with sbatch")
    job.add_argument("--script", type=Path,
                     help="with --submit: where to write the script (default: logs/<job_name>-<date_time>.sbatch "
                          "in the Ava checkout)")
    return parser


def slurm(argv: Sequence[str]) -> int:
    args = list(argv)
    split = args.index("--") if "--" in args else len(args)
    ns = _parser().parse_args(args[:split])
    train_args = args[split + 1:]
    request = JobRequest(ns.nodes, ns.gpus_per_node, ns.srun, ns.partition, ns.time, ns.cpus_per_task, ns.mem,
                         ns.job_name or SLURM_NAME(_default_job_name(ns.config)))
    resolved = _validate(ns, train_args, request)
    template = ns.template or template_path(ns.srun)
    variables = {"AVA_CONFIG": _absolute(ns.config), "AVA_HARDWARE_CONFIG": _absolute(ns.hardware_config),
                 "AVA_DISTRIBUTED_CONFIG": _absolute(ns.distributed_config),
                 "AVA_OUTPUT_DIR": _absolute(ns.output_dir) if ns.output_dir else None,
                 "AVA_EXTRA_ARGS": _extra_args(train_args),
                 "AVA_PYTHON": _absolute(ns.python) if ns.python and "/" in ns.python else ns.python,
                 "GPUS_PER_NODE": str(ns.gpus_per_node)}
    script = render(read_template(template), request.sbatch_options(),
                    {k: v for k, v in variables.items() if v is not None},
                    _header(template, argv, resolved, request), source=str(template))
    _warn_inherited(variables)
    if not ns.submit:
        sys.stdout.write(script)
        print(f"dry run: nothing submitted. Add --submit to submit it, or save it and run `sbatch FILE` from "
              f"{CHECKOUT} (with logs/ there)", file=sys.stderr)
        return 0
    sbatch = find_sbatch()  # before anything is written
    name = f"{request.job_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.sbatch"
    path = ns.script.absolute() if ns.script else CHECKOUT / "logs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    for directory in output_dirs(script):  # sbatch does not create the log directory; the job would die unseen
        (CHECKOUT / directory).mkdir(parents=True, exist_ok=True)
    job_id = submit(path, sbatch, cwd=CHECKOUT)
    print(f"submitted batch job {job_id}: {request.nodes} node(s) x {request.gpus_per_node} GPU(s); script {path}")
    return 0


def _validate(ns: argparse.Namespace, train_args: Sequence[str], request: JobRequest) -> ResolvedConfig:
    """Load the stack as train.py will in the job: same files, same overrides, the job's world size."""
    parser = argparse.ArgumentParser(prog="ava launch slurm ... --", allow_abbrev=False, add_help=False)
    add_stack_arguments(parser)
    for flag in TRAIN_SWITCHES:
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--resume", action="store_const", const=True)
    parser.add_argument("--resume_from")
    parser.add_argument("--output_dir")
    train_ns, overrides = parser.parse_known_args(train_args)
    for dest, ours in SET_BY_SCRIPT.items():
        if getattr(train_ns, dest) is None:
            continue
        if not ours:
            raise SbatchError(f"--{dest} after `--`: the job script resumes by itself, with --auto_resume in "
                              "--output_dir (launch/slurm/run_step.sh), and train.py refuses both together",
                              f"drop --{dest}; to continue an earlier run, pass its directory as --output_dir "
                              "to `ava launch slurm`")
        raise SbatchError(f"--{dest} after `--`: the job script passes it to train.py from `ava launch slurm "
                          f"{ours}`", f"pass {ours} to `ava launch slurm` itself, before `--`")
    files = ConfigFiles(ns.config, ns.hardware_config, ns.distributed_config, train_ns.rlhf_config)
    world = WorldSize(request.world_size, f"--nodes {request.nodes} x --gpus_per_node {request.gpus_per_node}")
    resolved = load_config(files, overrides, world)
    for notice in resolved.notices:
        print(notice.render(), file=sys.stderr)
    return resolved


def _header(template: Path, argv: Sequence[str], resolved: ResolvedConfig, request: JobRequest) -> list[str]:
    cfg, b = resolved.config, resolved.batch
    tokens = b.tokens_per_step(cfg.data.max_length)

    def origin(*path: str) -> str:
        return resolved.origin(path).where()

    shown = template.resolve().relative_to(CHECKOUT) if template.resolve().is_relative_to(CHECKOUT) else template
    return [
        f"Rendered by `ava launch slurm` from {shown}; edit the template (or re-render), not this copy.",
        "command: " + shlex.join(["ava", "launch", "slurm", *argv]),
        f"batch plan: micro {b.micro} x accumulation {b.accumulation} x {b.world.size} rank(s) "
        f"({request.nodes} node(s) x {request.gpus_per_node} GPU(s)) = global {b.global_batch} sequences "
        f"= {tokens:,} tokens per optimizer step",
        f"per GPU: micro batch {b.micro} [{origin('training', 'batch_size')}], precision "
        f"{cfg.training.mixed_precision} [{origin('training', 'mixed_precision')}], ZeRO stage "
        f"{cfg.deepspeed.zero_stage} [{origin('deepspeed', 'zero_stage')}]",
        *(notice.render() for notice in resolved.notices),
        "",
    ]


def _extra_args(train_args: Sequence[str]) -> str:
    """AVA_EXTRA_ARGS: the job script splits it on whitespace, without quote removal (run_step.sh)."""
    for arg in train_args:
        if not arg or any(c.isspace() for c in arg):
            raise SbatchError(f"the train.py argument {arg!r} after `--` is empty or holds whitespace, and the job "
                              "script splits AVA_EXTRA_ARGS on whitespace (no quoting)",
                              "use a value without spaces, or set it in a config file passed with --config")
    return " ".join(train_args)


def _default_job_name(config: str) -> str:
    return "ava-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(config).stem)


def _absolute(path: str | None) -> str:
    # the job may run from another directory than this shell; an empty value means "not given"
    return os.path.abspath(path) if path else ""


def _warn_inherited(rendered: dict[str, str | None]) -> None:
    """sbatch copies this shell's environment into the job, where `${NAME:-default}` prefers it to the default."""
    for name in VARIABLES:
        if os.environ.get(name) and os.environ[name] != rendered.get(name):
            print(f"warning: {name}={os.environ[name]!r} is set in this shell; sbatch passes it to the job, where it "
                  f"replaces the rendered value. Unset it (`unset {name}`) before submitting.", file=sys.stderr)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"slurm": slurm}

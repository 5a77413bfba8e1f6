"""Render a SLURM batch script from a shipped template, and submit it.

The templates (`launch/slurm/train.sbatch`: one deepspeed launcher per node;
`launch/slurm/train_srun.sbatch`: one task per GPU) follow one contract, and
this module relies on nothing else in them:

- every sbatch option sits on its own line as `#SBATCH --key=value`, before
  the first command (sbatch ignores `#SBATCH` lines after it);
- every run setting is a shell variable with a default, one per line, written
  `NAME="${NAME:-default}"`, for the names in `VARIABLES`.

Rendering replaces (or adds) the requested `#SBATCH` lines, replaces the
defaults of the variables and puts a header comment under the shebang;
every other line of the template is kept as it is, so the script a user
reviews is the script that runs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ava.errors import UserError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "launch" / "slurm"
LAUNCHER_TEMPLATE = "train.sbatch"  # one deepspeed launcher per node
SRUN_TEMPLATE = "train_srun.sbatch"  # one srun task per GPU
VARIABLES = ("AVA_CONFIG", "AVA_HARDWARE_CONFIG", "AVA_DISTRIBUTED_CONFIG", "AVA_OUTPUT_DIR", "AVA_EXTRA_ARGS",
             "AVA_PYTHON", "GPUS_PER_NODE")


class SbatchError(UserError):
    """A template that breaks the contract, or an sbatch that is missing or refuses the job.

    A `UserError`, so the CLI prints it without a traceback and exits 2.
    """


@dataclass(frozen=True)
class JobRequest:
    """The resources asked of SLURM; None leaves the template's line as it is."""

    nodes: int
    gpus_per_node: int
    srun: bool = False
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    job_name: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def sbatch_options(self) -> dict[str, str]:
        """`#SBATCH --key=value` options, in the order they are written."""
        options = {"job-name": self.job_name, "nodes": str(self.nodes), "gpus-per-node": str(self.gpus_per_node),
                   # srun starts one task per GPU; the launcher template starts one per node itself
                   "ntasks-per-node": str(self.gpus_per_node) if self.srun else None,
                   "cpus-per-task": None if self.cpus_per_task is None else str(self.cpus_per_task),
                   "mem": self.mem, "partition": self.partition, "time": self.time}
        return {key: value for key, value in options.items() if value is not None}


def template_path(srun: bool) -> Path:
    return TEMPLATE_DIR / (SRUN_TEMPLATE if srun else LAUNCHER_TEMPLATE)


def read_template(path: Path) -> str:
    if not path.is_file():
        raise SbatchError(f"the SLURM template {path} does not exist",
                          "run from an Ava checkout (the templates live in launch/slurm/) or pass --template FILE")
    return path.read_text()


def render(template: str, options: Mapping[str, str], variables: Mapping[str, str], header: Sequence[str],
           *, source: str = "template") -> str:
    """The template with `options` as `#SBATCH` lines, `variables` as defaults and `header` as comments."""
    lines = template.splitlines()
    lines = _set_options(lines, options, source)
    for name, value in variables.items():
        lines = _set_variable(lines, name, value, source)
    at = 1 if lines and lines[0].startswith("#!") else 0
    lines[at:at] = [_comment(text) for text in header]
    return "\n".join(lines) + "\n"


def _directive_end(lines: Sequence[str]) -> int:
    """Index of the first command: sbatch reads `#SBATCH` lines only above it."""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return i
    return len(lines)


def _set_options(lines: list[str], options: Mapping[str, str], source: str) -> list[str]:
    lines = list(lines)
    for key, value in options.items():
        if "\n" in value or not value.strip():
            raise SbatchError(f"#SBATCH --{key}: the value {value!r} is empty or spans lines", f"pass a valid --{key}")
        pattern = re.compile(rf"^#SBATCH\s+--{re.escape(key)}(=|\s|$)")
        end = _directive_end(lines)
        late = [i for i in range(end, len(lines)) if pattern.match(lines[i])]
        if late:
            raise SbatchError(f"{source}:{late[0] + 1}: `#SBATCH --{key}` comes after the first command, where sbatch "
                              "ignores it", "move every #SBATCH line above the first command of the template")
        found = [i for i in range(end) if pattern.match(lines[i])]
        line = f"#SBATCH --{key}={value}"
        if found:
            lines[found[0]] = line
            for i in reversed(found[1:]):  # a repeated option: the rendered value is the only one
                del lines[i]
        else:
            directives = [i for i in range(end) if lines[i].startswith("#SBATCH")]
            lines.insert(directives[-1] + 1 if directives else end, line)
    return lines


def _set_variable(lines: list[str], name: str, value: str, source: str) -> list[str]:
    pattern = re.compile(rf'^{name}="?\$\{{{name}:-')
    found = [i for i, line in enumerate(lines) if pattern.match(line)]
    if len(found) != 1:
        why = "has no" if not found else f"has {len(found)} (lines {', '.join(str(i + 1) for i in found)})"
        raise SbatchError(f'{source} {why} line `{name}="${{{name}:-...}}"`, which the renderer sets',
                          "give the template exactly one such line (the contract in launch/README.md), "
                          "or pass --template FILE")
    if "\n" in value or "\r" in value:
        raise SbatchError(f"{name}: the value {value!r} spans lines", "pass a value on one line")
    lines = list(lines)
    lines[found[0]] = variable_line(name, value)
    return lines


def variable_line(name: str, value: str) -> str:
    """`NAME="${NAME:-value}"`, with the value shell-quoted where it needs it.

    A quoted value drops the outer double quotes: inside them bash would keep
    the single quotes of `'my dir'` literally, whereas in an assignment
    `NAME=${NAME:-'my dir'}` undergoes quote removal and no word splitting.
    """
    quoted = shlex.quote(value)
    if value == "" or quoted == value:
        return f'{name}="${{{name}:-{value}}}"'
    return f"{name}=${{{name}:-{quoted}}}"


def _comment(text: str) -> str:
    # a newline in a user's argument must not end the comment and become a command
    return ("# " + text.replace("\r", "\\r").replace("\n", "\\n")).rstrip()


def output_dirs(script: str) -> list[Path]:
    """The directories of the script's `#SBATCH --output/--error` files (sbatch does not create them)."""
    lines = script.splitlines()
    dirs = []
    for line in lines[:_directive_end(lines)]:
        match = re.match(r"^#SBATCH\s+--(?:output|error)[=\s]+(\S+)", line)
        if match:
            parent = Path(match.group(1).strip("\"'")).parent
            if "%" not in str(parent) and str(parent) not in ("", "."):
                dirs.append(parent)
    return dirs


def find_sbatch() -> str:
    """The path of `sbatch`, or the error that says where to run instead."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SbatchError(
            "`--submit` needs SLURM's `sbatch`, and there is none on PATH: SLURM's client commands are installed on "
            "a cluster's login nodes, not on a workstation or inside a compute job's container",
            "run this command on the cluster's login node (after `module load slurm` where the site uses modules), "
            "or leave out --submit, save the printed script (`ava launch slurm ... > job.sbatch`) and run "
            "`sbatch job.sbatch` there")
    return sbatch


def submit(script_path: Path, sbatch: str, cwd: Path) -> str:
    """`sbatch --parsable SCRIPT` run in `cwd` (the job's submit directory); returns the job id."""
    result = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, timeout=120,
                            cwd=cwd)
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise SbatchError(f"sbatch refused {script_path}: {reason}",
                          "fix the option sbatch names (partition, time, memory, account) and submit again")
    return result.stdout.strip().split(";")[0]


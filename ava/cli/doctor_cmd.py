"""`ava doctor`: the first thing to run on a new machine or cluster node.

Prints the environment (versions, accelerator, backend, devices, precisions,
launcher variables, optional packages, tools), then starts a real 2-rank
ZeRO-3 job through the deepspeed launcher. Exit status 0 when nothing stands
in the way of training, 1 otherwise, with each problem and its fix.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ava doctor", allow_abbrev=False,
                                     description="Check this machine: environment, precisions, and a 2-rank ZeRO-3 start.")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the ZeRO-3 check (default 2)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds before the check counts as hung")
    parser.add_argument("--no_launch", action="store_true", help="report the environment only; start no job")
    ns = parser.parse_args(argv)
    if ns.ranks < 1:
        parser.error("--ranks must be at least 1")
    from rich.console import Console
    from rich.table import Table

    from ava.doctor.environment import gather
    from ava.doctor.zero3_check import run_zero3_probe

    console = Console()
    env = gather()
    table = Table(title="ava doctor: environment", show_header=False)
    table.add_column("", style="bold", overflow="fold")
    table.add_column("", overflow="fold")  # paths whole: a stale lock's row is the `rm` to type
    for label, value in env.rows():
        table.add_row(label, value)
    console.print(table)
    problems = list(env.problems)
    if not ns.no_launch:
        gpus = sum(1 for d in env.devices if d.startswith("cuda:"))
        console.print(f"starting a {ns.ranks}-rank ZeRO-3 job through the deepspeed launcher ...")
        result = run_zero3_probe(ns.ranks, env.accelerator, gpus, ns.timeout)
        console.print(f"ZeRO-3 start check: {result.summary}", markup=False, highlight=False, soft_wrap=True)
        if result.ok is False:
            problems.append(f"a {ns.ranks}-rank ZeRO-3 job cannot run here: {result.summary}. Its last output:\n"
                            f"{result.detail}")
        elif result.ok is None:
            console.print(f"  {result.detail}", markup=False, highlight=False)
    for problem in problems:
        console.print(f"problem: {problem}", style="bold red", markup=False, highlight=False, soft_wrap=True)
    console.print("doctor: " + ("ready to train" if not problems else f"{len(problems)} problem(s) found"))
    return 0 if not problems else 1

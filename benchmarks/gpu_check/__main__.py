"""`python -m benchmarks.gpu_check [--dry-run] ...`: parse, run the check, exit with its status."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks.gpu_check.check import Check
from benchmarks.gpu_check.plan import make_plan, stage_names
from benchmarks.gpu_check.wheels import REPO


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description="Check Ava on a lent GPU in one call "
                                 "(stages: " + ", ".join(stage_names(make_plan(False))) + ").")
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-ins for every stage (checks this script)")
    ap.add_argument("--wheels", default=str(REPO / ".gpu_wheels"), help="folder of the wheels to install")
    ap.add_argument("--json", default=None, help="where the JSON goes (default: $OUT/gpu_check.json when OUT is "
                    "set, else benchmarks/results/gpu_check.json); the log goes next to it")
    ap.add_argument("--workdir", default=None, help="run outputs and the wheel install (default: /dev/shm when it "
                    "has room, else the temp folder; --dry-run: a fresh temp folder)")
    ap.add_argument("--budget", type=int, default=480, help="seconds for all stages together (default 480)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; --dry-run 2)")
    ap.add_argument("--only", default=None, help="comma-separated stages to run (default: all); environment "
                    "always runs, and a wheel install from an earlier call in the same --workdir is used")
    ap.add_argument("--peak-tflops", default=None, help="BF16[,FP8] peak TFLOP/s for MFU (default: the datasheet "
                    "value for the GPU's name, else the measured matmul rate)")
    ap.add_argument("--train-timeout", type=int, default=150, help="seconds per training stage (default 150)")
    ap.add_argument("--train-arg", action="append", default=[], help="extra train.py argument (repeatable), e.g. "
                    "--train-arg=--compile --train-arg=false")
    ns = ap.parse_args(argv)
    if ns.json is None:
        ns.json = str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else \
            str(REPO / "benchmarks" / "results" / "gpu_check.json")
    unknown = set(ns.only.split(",")) - set(stage_names(make_plan(ns.dry_run))) if ns.only else set()
    if unknown:
        ap.error(f"--only: unknown stage(s) {', '.join(sorted(unknown))}")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    check = Check(ns)
    print(f"[gpu_check] {'dry run (CPU stand-ins)' if ns.dry_run else 'GPU check'}: budget {ns.budget} s, "
          f"python {sys.version.split()[0]} ({sys.executable}), work in {check.work}", flush=True)
    try:
        return check.run()
    finally:
        if ns.dry_run and not ns.workdir:
            shutil.rmtree(check.work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

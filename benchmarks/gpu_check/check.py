"""The check itself: runs the stages in order, each under its own timeout, and keeps the JSON and the log current.

Every stage but the wheel check runs as a subprocess under `timeout`, its
output appended to one log; a hang costs that stage alone, and the check goes
on to the next. The JSON is rewritten after each stage, so a call killed from
outside still leaves the stages it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.plan import TrainSpec, datasheet_peak, make_plan, stage_names, train_args
from benchmarks.gpu_check.probes import RESULT_PREFIX
from benchmarks.gpu_check.report import headline, junit_counts, memory_comparison, rate_text, read_run
from benchmarks.gpu_check.wheels import OPTIONAL, REPO, choose_wheels, installed, interpreter_tags, required_distributions

BAD = {"fail", "timeout", "error", "not_run"}  # besides: pass, skipped (by design, e.g. no JIT op on a CPU)
STAGE_TIMEOUTS = {"environment": 90, "wheels": 120, "imports": 90, "cuda_tests": 150, "deepspeed_ops": 240}
# Tests that assert an optional package is installed: deselected (and recorded) where it is not.
NEEDS_PACKAGE = {"wandb": ["tests/train/test_run_info.py::test_versions_name_python_ava_and_the_installed_libraries"]}


class Check:
    """Runs the stages, keeps their records, writes the JSON and the log."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns, self.plan = ns, make_plan(ns.dry_run, ns.steps)
        self.py = sys.executable
        self.json_path = Path(ns.json)
        self.log_path = self.json_path.with_suffix(".log")
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        self.work = Path(ns.workdir) if ns.workdir else default_workdir(ns.dry_run)
        self.work.mkdir(parents=True, exist_ok=True)
        self.site = self.work / "site"  # --target of the wheel install, first on PYTHONPATH
        self.started = time.time()
        self.deadline = self.started + ns.budget
        self.env: dict[str, Any] = {}
        self.peak: dict[str, Any] | None = None
        self.stages: list[dict[str, Any]] = []
        self.only = set(ns.only.split(",")) if ns.only else None
        self.estimates: dict[str, Any] | None = None  # Ava's memory estimate per training stage, probed once

    def run(self) -> int:
        for name in stage_names(self.plan):
            if self.only is not None and name not in self.only and name != "environment":  # MFU needs its peak
                continue
            remaining = self.deadline - time.time()
            timeout = int(min(STAGE_TIMEOUTS.get(name, self.ns.train_timeout), remaining))
            record: dict[str, Any] = {"name": name, "status": "not_run", "seconds": 0.0, "timeout_s": timeout}
            self.stages.append(record)
            if timeout < 15:
                record["reason"] = f"out of budget ({self.ns.budget} s; {remaining:.0f} s left)"
            else:
                start = time.time()
                try:
                    self.stage(name)(record, timeout)
                except Exception as exc:  # this script's own fault: record it and go on
                    record.update(status="error", error=f"{type(exc).__name__}: {exc}")
                record["seconds"] = round(time.time() - start, 1)
            self.say(record)
            self.write()
        self.write(final=True)
        self.print_table()
        return 1 if any(s["status"] in BAD for s in self.stages) else 0

    def stage(self, name: str) -> Any:
        """The method that runs stage `name`: stage_<name>(record, timeout)."""
        for spec in self.plan.trains:
            if spec.name == name:
                return lambda record, timeout: self.stage_train(record, timeout, spec)
        return getattr(self, "stage_" + name)

    # -------------------------------------------------------- stages

    def stage_environment(self, record: dict[str, Any], timeout: int) -> None:
        result = self.subprocess(record, self.probe("environment"), timeout)
        if result is not None:
            self.env = result
            record["details"] = result
            if not self.ns.dry_run and not result.get("cuda_available"):
                record.update(status="fail", error="torch sees no CUDA device")
        self.peak = self.choose_peak()
        record.setdefault("details", {})["peak"] = self.peak

    def stage_wheels(self, record: dict[str, Any], timeout: int) -> None:
        folder = Path(self.ns.wheels)
        files = sorted(folder.glob("*.whl")) if folder.is_dir() else []
        details: dict[str, Any] = {"folder": str(folder), "wheels": len(files)}
        record["details"] = details
        if not files and self.ns.dry_run:  # stand-ins: one wheel that fits any Python 3, one that fits none
            folder = self.work / "standin_wheels"
            folder.mkdir(exist_ok=True)
            files = [folder / "standin-1.0-py3-none-any.whl", folder / "standin_ext-1.0-cp27-cp27mu-linux_armv6l.whl"]
            for f in files:
                f.touch()
            details["standins"] = True
        choice = choose_wheels(files, interpreter_tags())
        details.update(choice)
        provided = set(choice["versions"])
        missing = [d for d in required_distributions() if d not in OPTIONAL and d != "torch" and installed(d) is None
                   and re.sub(r"[-_.]+", "-", d) not in provided]
        if installed("torch") is None:
            missing.insert(0, "torch")
        details["missing"] = missing
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        messages = choice["problems"][:]
        if choice["unfit"]:
            messages.insert(0, f"{len(choice['unfit'])} wheel(s) in {folder} do not fit this interpreter "
                            f"(CPython {sys.version.split()[0]}): {', '.join(choice['unfit'])}. Fetch them for it "
                            f"with: scripts/gpu_check.sh --fetch-wheels --python-version {version}")
        if missing:
            messages.append(f"missing, and no wheel for: {', '.join(missing)}. Fetch the wheels beforehand "
                            "(scripts/gpu_check.sh --fetch-wheels, where there is network) and carry .gpu_wheels")
        if messages:
            record["error"] = "\n".join(messages)
        if self.ns.dry_run:  # check only: never install into the machine's own environment
            details["would_run"] = self.pip_install(choice["install"])
            record["status"] = "pass"
            return
        record["status"] = "pass"
        if choice["install"]:
            self.site.mkdir(parents=True, exist_ok=True)
            self.subprocess(record, self.pip_install(choice["install"]), timeout, expect_result=False)
        if messages and record["status"] == "pass":
            record["status"] = "fail"

    def pip_install(self, files: list[str]) -> list[str]:
        return [self.py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                "--disable-pip-version-check", "--quiet", "--target", str(self.site), "--find-links",
                str(self.ns.wheels), *files]

    def stage_imports(self, record: dict[str, Any], timeout: int) -> None:
        result = self.subprocess(record, self.probe("imports"), timeout)
        if result is None:
            return
        record["details"] = result
        want = "cpu" if self.ns.dry_run else "cuda"
        problems = [f"cannot import {d}: {m['error']}" for d, m in result["modules"].items()
                    if not m["ok"] and d not in OPTIONAL]
        if result.get("torchao_float8") is not True:
            problems.append(f"torchao.float8: {result.get('torchao_float8')}")
        if result.get("deepspeed_accelerator") != want:
            problems.append(f"DeepSpeed picked the accelerator {result.get('deepspeed_accelerator')!r}, not {want!r}")
        if problems:
            record.update(status="fail", error="\n".join(problems))

    def stage_cuda_tests(self, record: dict[str, Any], timeout: int) -> None:
        junit = self.work / "junit.xml"
        junit.unlink(missing_ok=True)
        deselected = {test: f"needs {dist}, which is not installed" for dist, tests in NEEDS_PACKAGE.items()
                      if not self.available(dist) for test in tests
                      if any(test.startswith(f + "::") for f in self.plan.tests)}
        cmd = [self.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *self.plan.tests,
               *[arg for test in deselected for arg in ("--deselect", test)]]
        self.subprocess(record, cmd, timeout, expect_result=False, env=self.child_env(accelerator=False))
        record["details"] = {**(junit_counts(junit) if junit.exists() else {}), "deselected": deselected}

    def stage_deepspeed_ops(self, record: dict[str, Any], timeout: int) -> None:
        if self.ns.dry_run:
            record.update(status="skipped", reason="CPU: DeepSpeed runs torch's AdamW (torch_adam), no JIT op to build")
            return
        result = self.subprocess(record, self.probe("deepspeed_ops"), timeout)
        if result is not None:
            record["details"] = result
            if not result.get("step_changed_weights"):
                record.update(status="fail", error="FusedAdam's step left the weights unchanged")

    def stage_train(self, record: dict[str, Any], timeout: int, spec: TrainSpec) -> None:
        out = self.work / spec.name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [self.py, "train.py", *train_args(spec, self.plan), "--output_dir", str(out), *self.ns.train_arg]
        self.subprocess(record, cmd, timeout, expect_result=False)
        details = read_run(out, spec, self.peak, self.env)
        details.update(memory_comparison(details, self.memory_estimates(record).get(spec.name)))
        record["details"] = details
        if record["status"] == "pass" and not (details.get("completed") and details.get("checks_passed")
                                               and (details.get("tokens_per_s") or 0) > 0):
            record.update(status="fail", error=f"the run did not complete cleanly: {details.get('run_status')}, "
                                               f"checks {details.get('checks')}")
        for heavy in ("checkpoints", "model"):  # gigabytes each on the GPU; the numbers are read already
            shutil.rmtree(out / heavy, ignore_errors=True)

    def memory_estimates(self, record: dict[str, Any]) -> dict[str, Any]:
        """Ava's memory estimate of every training stage's run (one probe, the first time it is asked)."""
        if self.estimates is None:
            probe: dict[str, Any] = {"name": "memory_estimate"}
            timeout = int(max(15, min(90, self.deadline - time.time())))
            self.estimates = self.subprocess(probe, self.probe("memory_estimate"), timeout) or {}
            if probe.get("error"):
                record["memory_estimate_error"] = probe["error"][-2000:]
        return self.estimates

    # -------------------------------------------------------- plumbing

    def probe(self, name: str) -> list[str]:
        return [self.py, "-m", "benchmarks.gpu_check.probes", name, *(["--dry-run"] if self.ns.dry_run else [])]

    def available(self, distribution: str) -> bool:
        """Installed for this interpreter, or by the wheels stage into the work folder."""
        return installed(distribution) is not None or any(self.site.glob(f"{distribution}-*.dist-info"))

    def child_env(self, accelerator: bool = True) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        paths = [str(self.site)] if self.site.exists() else []
        env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.pop("DS_ACCELERATOR", None)
        if accelerator:  # the tests choose their own (tests/conftest.py: cpu)
            env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR") or ("cpu" if self.ns.dry_run else "cuda")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        if self.env.get("capability"):  # DeepSpeed's JIT ops are built for this GPU only
            env.setdefault("TORCH_CUDA_ARCH_LIST", self.env["capability"])
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        return env

    def subprocess(self, record: dict[str, Any], cmd: list[str], timeout: int, expect_result: bool = True,
                   env: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Run `cmd` under `timeout`, its output appended to the log; sets status, rc, error; returns a probe's JSON."""
        record["command"] = " ".join(cmd)
        # timeout(1) signals the command's whole process group (compile workers, ninja) and SIGKILLs 10 s later
        wrapped = ["timeout", "--kill-after=10", str(timeout), *cmd] if shutil.which("timeout") else cmd
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {record['name']}: {record['command']}\n".encode())
            log.flush()
            start = log.tell()
            try:
                rc = subprocess.run(wrapped, cwd=REPO, env=env or self.child_env(), stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout + 30).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        text = self.log_path.read_bytes()[start:].decode(errors="replace")
        record["rc"] = rc
        if rc in (124, 137):
            record.update(status="timeout", error=f"killed after {timeout} s\n" + tail(text))
            return None
        record["status"] = "pass" if rc == 0 else "fail"
        if rc != 0:
            record["error"] = tail(text)
        if not expect_result:
            return None
        lines = [line for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            record.update(status="fail" if rc else "error", error=record.get("error") or "the probe printed no result")
            return None
        return json.loads(lines[-1][len(RESULT_PREFIX):])

    def choose_peak(self) -> dict[str, Any] | None:
        if self.ns.peak_tflops:
            bf16, _, fp8 = self.ns.peak_tflops.partition(",")
            return {"bf16_flops": float(bf16) * 1e12, "fp8_flops": float(fp8) * 1e12 if fp8 else None,
                    "source": "--peak-tflops"}
        sheet = datasheet_peak(self.env.get("gpu_name"))
        if sheet is not None:
            return sheet
        if self.env.get("matmul_bf16_flops"):  # no datasheet entry (a CPU in --dry-run): the rate measured here
            return {"bf16_flops": self.env["matmul_bf16_flops"], "fp8_flops": self.env.get("matmul_fp8_flops"),
                    "source": "measured matmul rate (no datasheet entry for this device)"}
        return None

    def say(self, record: dict[str, Any]) -> None:
        line = headline(record)
        print(f"[gpu_check] {record['name']}: {record['status'].upper()} in {record['seconds']:.1f} s"
              + (f": {line}" if line else ""), flush=True)
        for key in ("reason", "error"):
            if record.get(key):
                print("    " + record[key].replace("\n", "\n    "), flush=True)

    def write(self, final: bool = False) -> None:
        payload = {
            "check": "ava gpu_check", "schema": 1, "mode": "dry-run" if self.ns.dry_run else "gpu",
            "started_utc": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - self.started, 1), "budget_s": self.ns.budget, "finished": final,
            "python": sys.version.split()[0], "executable": self.py, "repo_commit": git_commit(),
            "peak": self.peak, "steps": self.plan.steps, "logging_steps": self.plan.logging_steps,
            "stage_names": stage_names(self.plan), "stages": self.stages,
            "ok": not any(s["status"] in BAD for s in self.stages),
        }
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        tmp.replace(self.json_path)  # a kill between the two leaves the previous complete file

    def print_table(self) -> None:
        print(f"\n=== gpu_check ({'dry run, CPU stand-ins' if self.ns.dry_run else 'GPU'}): "
              f"{time.time() - self.started:.0f} s; JSON {self.json_path}, log {self.log_path}")
        if self.peak:
            print(f"MFU = tokens/s x Ava's training FLOPs/token (6N + attention) / peak; peak {self.peak['source']}: "
                  f"bf16 {rate_text(self.peak['bf16_flops'])}"
                  + (f", fp8 {rate_text(self.peak['fp8_flops'])}" if self.peak.get("fp8_flops") else ""))
        rows = [["stage", "status", "s", "result"]]
        rows += [[s["name"], s["status"], f"{s['seconds']:.1f}", headline(s)] for s in self.stages]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2].rjust(widths[2])}  {r[3]}")


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def default_workdir(dry_run: bool) -> Path:
    if dry_run:
        return Path(tempfile.mkdtemp(prefix="ava_gpu_check_"))
    shm = Path("/dev/shm")  # the 0.5B runs' final checkpoints (7.5 GB each) write at memory speed there
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return shm / "ava_gpu_check"
    return Path(tempfile.gettempdir()) / "ava_gpu_check"

"""`ava launch slurm`: the rendered batch script, validation before submission, and a missing sbatch.

No SLURM is needed. A fixture template that follows the launch/slurm contract
(`#SBATCH --key=value` lines, `NAME="${NAME:-default}"` variables) pins the
renderer; the shipped templates are then rendered the same way, and their
own `ava_train_args` (launch/slurm/run_step.sh) must turn the rendered
variables into exactly the train.py arguments that were validated.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ava.cli.main import main
from tests.conftest import REPO

SHIPPED = {"launcher": REPO / "launch" / "slurm" / "train.sbatch", "srun": REPO / "launch" / "slurm" / "train_srun.sbatch"}
FIXTURE = textwrap.dedent("""\
    #!/bin/bash
    # A template that follows the launch/slurm contract, and no more.
    #SBATCH --job-name=ava
    #SBATCH --nodes=1
    #SBATCH --ntasks-per-node=1
    #SBATCH --gpus-per-node=8
    #SBATCH --time=24:00:00
    #SBATCH --output={logs}/%x-%j.out

    AVA_CONFIG="${{AVA_CONFIG:-configs/gpu/base.yaml}}"
    AVA_HARDWARE_CONFIG="${{AVA_HARDWARE_CONFIG:-configs/hardware/a100_80gb.yaml}}"
    AVA_DISTRIBUTED_CONFIG="${{AVA_DISTRIBUTED_CONFIG:-configs/distributed/deepspeed_zero2.yaml}}"
    AVA_OUTPUT_DIR="${{AVA_OUTPUT_DIR:-outputs/${{SLURM_JOB_NAME}}-${{SLURM_JOB_ID}}}}"
    AVA_EXTRA_ARGS="${{AVA_EXTRA_ARGS:-}}"
    AVA_PYTHON="${{AVA_PYTHON:-python}}"
    GPUS_PER_NODE="${{GPUS_PER_NODE:-8}}"
    echo "$AVA_CONFIG"
    """)
H100 = ["--config", "configs/gpu/base.yaml", "--hardware_config", "configs/hardware/h100_80gb.yaml"]
VARIABLES = ("AVA_CONFIG", "AVA_HARDWARE_CONFIG", "AVA_DISTRIBUTED_CONFIG", "AVA_OUTPUT_DIR", "AVA_EXTRA_ARGS",
             "AVA_PYTHON", "GPUS_PER_NODE")


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "fixture.sbatch"
    path.write_text(FIXTURE.format(logs=tmp_path / "joblogs"))
    return path


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the config paths below are the repo's
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def render(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["launch", "slurm", *args]) == 0
    return capsys.readouterr().out


def cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", *VARIABLES)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "ava", "launch", "slurm", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def directives(script: str) -> dict[str, list[str]]:
    """`#SBATCH --key=value` lines above the first command, by key."""
    found: dict[str, list[str]] = {}
    for line in script.splitlines():
        if line.strip() and not line.startswith("#"):
            break
        match = re.match(r"#SBATCH --([\w-]+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def shell_values(script: str, *names: str) -> dict[str, str]:
    """The variables as bash assigns them from the script's own lines (outside SLURM, no AVA_* set)."""
    assignments = [line for line in script.splitlines() if re.match(r"^[A-Z_]+=", line)]
    show = "".join(f'printf "%s\\0" "${name}"\n' for name in names)
    out = subprocess.run(["bash", "-c", "\n".join(assignments) + "\n" + show], capture_output=True, text=True,
                         check=True, env={"PATH": os.environ["PATH"], "SLURM_JOB_NAME": "job", "SLURM_JOB_ID": "7"})
    return dict(zip(names, out.stdout.split("\0")[:-1], strict=True))


def test_rendered_script_sets_each_requested_sbatch_option_once(template, capsys):
    script = render(capsys, *H100, "--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu-long",
                    "--time", "1-12:00:00", "--cpus_per_task", "48", "--mem", "480G", "--job_name", "pretrain",
                    "--template", str(template))
    found = directives(script)
    expected = {"nodes": "2", "gpus-per-node": "4", "partition": "gpu-long", "time": "1-12:00:00",
                "cpus-per-task": "48", "mem": "480G", "job-name": "pretrain"}
    assert {key: found.get(key) for key in expected} == {key: [value] for key, value in expected.items()}
    assert found["ntasks-per-node"] == ["1"]  # one deepspeed launcher per node: the template's line stays
    assert found["output"] == [f"{template.parent}/joblogs/%x-%j.out"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_srun_asks_for_one_task_per_gpu(template, capsys):
    script = render(capsys, *H100, "--nodes", "3", "--gpus_per_node", "4", "--srun", "--template", str(template))
    assert directives(script)["ntasks-per-node"] == ["4"]
    assert shell_values(script, "GPUS_PER_NODE") == {"GPUS_PER_NODE": "4"}


def test_variables_reach_bash_verbatim_even_with_spaces_quotes_and_dollars(template, capsys, tmp_path):
    out = tmp_path / "my runs" / "it's $HOME"
    script = render(capsys, *H100, "--nodes", "1", "--gpus_per_node", "8", "--output_dir", str(out),
                    "--python", "/opt/venv one/bin/python", "--template", str(template), "--", "--max_steps", "20000")
    values = shell_values(script, *VARIABLES)
    assert values == {"AVA_CONFIG": str(REPO / "configs/gpu/base.yaml"),
                      "AVA_HARDWARE_CONFIG": str(REPO / "configs/hardware/h100_80gb.yaml"),
                      "AVA_DISTRIBUTED_CONFIG": "",  # not given: the template's zero2 default must not sneak in
                      "AVA_OUTPUT_DIR": str(out), "AVA_EXTRA_ARGS": "--max_steps 20000",
                      "AVA_PYTHON": "/opt/venv one/bin/python", "GPUS_PER_NODE": "8"}


def test_template_defaults_stay_where_no_option_is_given(template, capsys):
    script = render(capsys, *H100, "--nodes", "1", "--gpus_per_node", "8", "--template", str(template))
    assert directives(script)["time"] == ["24:00:00"]
    assert shell_values(script, "AVA_OUTPUT_DIR", "AVA_PYTHON") == {"AVA_OUTPUT_DIR": "outputs/job-7",
                                                                     "AVA_PYTHON": "python"}
    assert 'AVA_OUTPUT_DIR="${AVA_OUTPUT_DIR:-outputs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"' in script.splitlines()


def test_header_records_the_command_and_the_batch_plan_from_the_hardware_preset(template, capsys):
    script = render(capsys, *H100, "--nodes", "2", "--gpus_per_node", "8", "--template", str(template))
    head = script.splitlines()[:6]
    assert head[0] == "#!/bin/bash"
    assert all(line.startswith("#") for line in head)
    assert any(line.startswith("# command: ava launch slurm --config configs/gpu/base.yaml") for line in head)
    # h100_80gb.yaml: micro batch 6, accumulation 8, fp8, ZeRO-3; 2 nodes x 8 GPUs = 16 ranks
    plan = next(line for line in head if line.startswith("# batch plan:"))
    assert "micro 6 x accumulation 8 x 16 rank(s) (2 node(s) x 8 GPU(s)) = global 768 sequences" in plan
    per_gpu = next(line for line in head if line.startswith("# per GPU:"))
    assert re.search(r"micro batch 6 \[configs/hardware/h100_80gb.yaml:\d+\], precision fp8 "
                     r"\[configs/hardware/h100_80gb.yaml:\d+\], ZeRO stage 3 \[configs/hardware/h100_80gb.yaml:\d+\]",
                     per_gpu), per_gpu


def test_a_value_spanning_lines_is_refused(template, capsys):
    assert main(["launch", "slurm", *H100, "--nodes", "1", "--gpus_per_node", "8", "--template", str(template),
                 "--output_dir", "runs/a\ntouch /tmp/pwned"]) == 2
    assert f"AVA_OUTPUT_DIR: the value '{REPO}/runs/a\\ntouch /tmp/pwned' spans lines" in capsys.readouterr().err


def test_a_bad_config_fails_before_anything_is_rendered(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sise: 512\n")
    result = cli("--config", str(bad), "--nodes", "2", "--gpus_per_node", "8", "--submit", path="/nonexistent")
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and f"{bad}:2" in result.stderr and "hidden_size" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_the_config_is_validated_for_nodes_times_gpus_per_node_ranks(capsys):
    # deepspeed_zero2.yaml: global 64 = micro 4 x accumulation x ranks; 16 ranks fit, 24 do not
    stack = ["--config", "configs/gpu/base.yaml", "--distributed_config", "configs/distributed/deepspeed_zero2.yaml"]
    script = render(capsys, *stack, "--nodes", "2", "--gpus_per_node", "8")
    assert "micro 4 x accumulation 1 x 16 rank(s)" in script
    assert main(["launch", "slurm", *stack, "--nodes", "3", "--gpus_per_node", "8"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "24" in err


def test_train_arguments_after_dashes_are_validated_with_the_stack(capsys):
    assert main(["launch", "slurm", *H100, "--nodes", "1", "--gpus_per_node", "8", "--", "--max_steps", "many"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "max_steps" in err


@pytest.mark.parametrize(("after", "needle"), [
    (["--output_dir", "x"], "pass --output_dir to `ava launch slurm` itself"),
    (["--num_gpus", "4"], "pass --gpus_per_node to `ava launch slurm` itself"),
    (["--resume"], "resumes by itself"),
    (["--run_name", "two words"], "splits AVA_EXTRA_ARGS on whitespace"),
])
def test_train_arguments_the_job_script_cannot_carry_are_refused(after, needle, capsys):
    assert main(["launch", "slurm", *H100, "--nodes", "1", "--gpus_per_node", "8", "--", *after]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Fix:" in err


def test_a_malformed_time_limit_is_a_usage_error():
    result = cli(*H100, "--nodes", "1", "--gpus_per_node", "8", "--time", "two hours")
    assert result.returncode == 2 and "not a SLURM time limit" in result.stderr and "Traceback" not in result.stderr


def test_a_template_without_a_contract_variable_is_named(tmp_path, capsys):
    broken = tmp_path / "broken.sbatch"
    broken.write_text(FIXTURE.format(logs="logs").replace('GPUS_PER_NODE="${GPUS_PER_NODE:-8}"\n', ""))
    assert main(["launch", "slurm", *H100, "--nodes", "1", "--gpus_per_node", "8", "--template", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken} has no line `GPUS_PER_NODE=" in err and "Fix:" in err


def test_submit_without_sbatch_on_path_is_one_clear_error(template, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    script = tmp_path / "job.sbatch"
    result = cli(*H100, "--nodes", "2", "--gpus_per_node", "8", "--template", str(template), "--submit",
                 "--script", str(script), path=str(empty))
    assert result.returncode == 2, result.stderr
    assert "needs SLURM's `sbatch`, and there is none on PATH" in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not script.exists()  # nothing written before the failure


def test_submit_writes_the_script_and_runs_sbatch_from_the_checkout(template, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "sbatch-call"
    (fake / "sbatch").write_text(f'#!/bin/sh\n{{ pwd; printf "%s\\n" "$@"; }} > "{record}"\necho "4242;cluster"\n')
    (fake / "sbatch").chmod(0o755)
    args = [*H100, "--nodes", "2", "--gpus_per_node", "8", "--template", str(template)]
    printed = cli(*args).stdout
    script = tmp_path / "jobs" / "pretrain.sbatch"
    result = cli(*args, "--submit", "--script", str(script), path=f"{fake}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert "submitted batch job 4242" in result.stdout
    assert record.read_text().splitlines() == [str(REPO), "--parsable", str(script)]
    def without_command(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("# command: ")]

    assert without_command(script.read_text()) == without_command(printed)
    assert (tmp_path / "joblogs").is_dir()  # sbatch would not create the --output directory


def test_a_variable_set_in_this_shell_is_warned_about(template, capsys, monkeypatch):
    monkeypatch.setenv("AVA_CONFIG", "configs/gpu/large.yaml")
    assert main(["launch", "slurm", *H100, "--nodes", "1", "--gpus_per_node", "8", "--template", str(template)]) == 0
    assert "warning: AVA_CONFIG='configs/gpu/large.yaml' is set in this shell" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["launcher", "srun"])
def test_shipped_template_renders_and_runs_the_validated_train_command(mode, capsys, tmp_path):
    """The shipped script's own ava_train_args turns the rendered variables into the validated arguments."""
    if not SHIPPED[mode].is_file():
        pytest.fail(f"{SHIPPED[mode]} is missing")
    out = tmp_path / "run"
    script = render(capsys, *H100, "--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu", "--time",
                    "04:00:00", "--output_dir", str(out), *(["--srun"] if mode == "srun" else []),
                    "--", "--max_steps", "20000", "--learning_rate", "3e-4")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    found = directives(script)
    assert {k: found[k] for k in ("nodes", "gpus-per-node", "partition", "time")} == {
        "nodes": ["2"], "gpus-per-node": ["4"], "partition": ["gpu"], "time": ["04:00:00"]}
    assert found["ntasks-per-node"] == (["4"] if mode == "srun" else ["1"])
    assignments = "\n".join(line for line in script.splitlines() if re.match(r"^[A-Z_]+=", line))
    program = f'{assignments}\nsource launch/slurm/run_step.sh\nava_train_args\nprintf "%s\\0" "${{AVA_TRAIN_ARGS[@]}}"'
    argv = subprocess.run(["bash", "-c", program], cwd=REPO, capture_output=True, text=True, check=True,
                          env={"PATH": os.environ["PATH"]}).stdout.split("\0")[:-1]
    assert argv == ["train.py", "--config", str(REPO / "configs/gpu/base.yaml"),
                    "--hardware_config", str(REPO / "configs/hardware/h100_80gb.yaml"),
                    "--output_dir", str(out), "--auto_resume", "--max_steps", "20000", "--learning_rate", "3e-4"]


def _step_commands(script: str) -> list[str]:
    """The `ava_run_step srun ...` command of a script, its continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [line for line in joined.splitlines() if line.startswith("ava_run_step ")]


@pytest.mark.parametrize("name", ["train.sbatch", "train_srun.sbatch", "train_cpu.sbatch"])
def test_every_shipped_template_ends_the_step_when_one_rank_fails(name):
    [step] = _step_commands((REPO / "launch" / "slurm" / name).read_text())
    assert step.startswith("ava_run_step srun --kill-on-bad-exit=1 "), step


@pytest.mark.parametrize("mode", ["launcher", "srun"])
def test_rendered_scripts_keep_kill_on_bad_exit(mode, capsys):
    script = render(capsys, *H100, "--nodes", "2", "--gpus_per_node", "4", *(["--srun"] if mode == "srun" else []))
    [step] = _step_commands(script)
    assert "srun --kill-on-bad-exit=1 " in step


def test_the_per_node_launcher_outlives_term_so_its_ranks_can_finish(tmp_path):
    """train.sbatch: TERM to the step (--kill-on-bad-exit, scancel) is the deepspeed launcher's to pass on to its
    ranks; the shell and the runner above it must not die of it, or SLURM SIGKILLs ranks still writing."""
    script = (REPO / "launch" / "slurm" / "train.sbatch").read_text()
    body = script[script.index("ava_launch_node() {"):script.index("export -f ava_launch_node")]
    # The `deepspeed` runner, faked: SLURM's TERM reaches every process of the step, then the ranks finish.
    runner = tmp_path / "python"
    runner.write_text(f"#!{sys.executable}\nimport os, signal, time\nos.killpg(os.getpgrp(), signal.SIGTERM)\n"
                      "time.sleep(0.5)\nprint('ranks finished', flush=True)\nraise SystemExit(75)\n")
    runner.chmod(0o755)
    program = (f"{body}\nAVA_PYTHON={runner}; SLURM_JOB_NODELIST=n1; SLURM_JOB_ID=1; SLURM_NODEID=0; "
               "SLURM_NNODES=1; GPUS_PER_NODE=1\nscontrol() { echo n1; }\nava_launch_node train.py")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}, start_new_session=True)
    assert (done.returncode, done.stdout) == (75, "ranks finished\n"), done.stderr

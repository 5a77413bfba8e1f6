"""Every command in README.md and docs/*.md runs, so the docs cannot drift from the code.

The commands are read from the ```bash/sh code blocks (continuation lines joined, `#` comments,
environment assignments, pipes and redirections taken apart) and checked in-process, without a
subprocess per command:

- `python train.py ...`, `ava train ...` and `deepspeed ... train.py ...`: a dry run (`--dry_run`
  added), which validates the whole config stack and exits. Under `deepspeed`, the launcher's
  `--num_gpus`/`--num_nodes` are given to train.py as the world size of the dry run, as a real launch
  would see it. A `training.init_from` directory that does not exist here (a model the reader fetches
  first) makes a dry run refuse, so such a command is checked with `ava config validate`, which
  accepts it with a warning.
- `python train_rlhf.py ...` and `ava rlhf ...`: a dry run.
- the cheap `ava` commands run for real: `config ...`, `model summary`, `launch slurm` (the script
  is printed; `--submit` is dropped) and `doctor` (with `--no_launch`: the 2-rank start check is
  `tests/doctor/`'s).
- `ava` commands that do real work (`generate`, `model import-hf | export-hf | export-checkpoint`,
  `rag build-index`) with `--help`; every option the doc uses must be one the command knows, and the
  config stack and overrides of `rag build-index` are validated.
- scripts (`benchmarks/*.py`, `python -m benchmarks`, `scripts/*.sh`): the file exists and knows
  every option the doc passes it; `make X`: the Makefile has the target; `sbatch FILE`: a
  `launch/` script exists, or an earlier command of the same doc wrote FILE.

A block preceded by `<!-- doc-test: skip: REASON -->` is left out. Python blocks that call
`ava.train.run` are executed with the run replaced by a stand-in that drives their callbacks through
the real `Callback` interface; YAML blocks are validated as a config layer over `tiny.yaml`.
Relative links and their anchors must resolve, and every guide opens with a table of contents.
"""

from __future__ import annotations

import inspect
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SKIP_MARK = re.compile(r"<!--\s*doc-test:\s*skip:?\s*(?P<reason>.*?)\s*-->")
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>", "2>&1", ">&"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
AVAS = {"ava", ".venv/bin/ava"}
# Options of train.py that are not part of the config stack: dropped when a command falls back to `ava config validate`.
RUN_ONLY = {"--dry_run": 0, "--output_dir": 1, "--resume": 0, "--resume_from": 1, "--force_resume": 0,
            "--trust_checkpoint": 0, "--auto_resume": 0}
STACK_OPTIONS = ("--config", "--hardware_config", "--distributed_config", "--rlhf_config", "--num_gpus",
                 "--num_nodes")
HELP_ONLY = {("generate",), ("model", "import-hf"), ("model", "export-hf"), ("model", "export-checkpoint"),
             ("rag", "build-index")}


@dataclass
class Block:
    doc: Path
    line: int  # of the fence
    lang: str
    text: str
    skip: str | None  # the reason, when marked


@dataclass
class Command:
    doc: Path
    line: int
    text: str  # the whole logical line, as written
    argv: list[str]  # this command's words, environment and redirections removed
    written_before: set[str] = field(default_factory=set)  # files earlier commands of the doc redirected into

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def _blocks(doc: Path) -> list[Block]:
    blocks, lines = [], doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.search(prev)
        blocks.append(Block(doc, start + 1, fence.group(1).lower(), textwrap.dedent("\n".join(body)),
                            mark.group("reason") if mark else None))
        i += 1
    return blocks


def _logical_lines(block: Block) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for offset, raw in enumerate(block.text.splitlines(), start=1):
        if not pending:
            first = block.line + offset
        stripped = raw.strip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        if pending.strip() and not pending.lstrip().startswith("#"):
            out.append((first, pending.strip()))
        pending = ""
    return out


def _words(text: str) -> list[list[str]]:
    """A shell line as its simple commands: env assignments, redirections and comments removed."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in SEPARATORS:
            commands.append([])
        elif token in REDIRECTS or re.fullmatch(r"\d?>>?&?\d?", token):
            i += 1  # and its target
        elif not commands[-1] and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", token):
            pass  # VAR=value before the command
        else:
            commands[-1].append(token)
        i += 1
    return [c for c in commands if c]


def _redirect_targets(text: str) -> set[str]:
    return set(re.findall(r">>?\s*([\w./-]+)", text))


def _commands() -> tuple[list[Command], list[Block]]:
    commands: list[Command] = []
    skipped: list[Block] = []
    for doc in DOCS:
        written: set[str] = set()
        for block in _blocks(doc):
            if block.lang not in SHELL_LANGS:
                continue
            if block.skip is not None:
                skipped.append(block)
                continue
            for line, text in _logical_lines(block):
                for argv in _words(text):
                    commands.append(Command(doc, line, text, argv, set(written)))
                written |= _redirect_targets(text)
    return commands, skipped


COMMANDS, SKIPPED = _commands()


def _kind(argv: list[str]) -> str:
    head = argv[0]
    if head in PYTHONS and argv[1:3] == ["-m", "ava"]:
        return "ava"
    if head in PYTHONS and len(argv) > 1 and argv[1] == "-c":
        return "other"
    if head in PYTHONS and len(argv) > 1:
        return _kind(argv[1:]) if argv[1].endswith(".py") or argv[1] == "-m" else "other"
    if head in ("train.py", "./train.py"):
        return "train"
    if head in ("train_rlhf.py", "./train_rlhf.py"):
        return "rlhf"
    if head in AVAS:
        return "ava"
    if head == "deepspeed":
        return "deepspeed"
    if head == "-m" or head.endswith((".py", ".sh")) or (head == "bash" and len(argv) > 1):
        return "script"
    if head in ("make", "sbatch"):
        return head
    return "other"


CHECKED = [c for c in COMMANDS if _kind(c.argv) != "other"]


def _id(command: Command) -> str:
    text = " ".join(command.argv)
    return f"{command.where}: {text[:90]}{'...' if len(text) > 90 else ''}"


def _options(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--name value` / `--name=value` / `--flag` pairs (after a `--`, train.py's options: left out)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            break
        if token.startswith("--"):
            if "=" in token:
                name, value = token.split("=", 1)
                out.append((name, value))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append((token, argv[i + 1]))
                i += 1
            else:
                out.append((token, None))
        i += 1
    return out


def _value(argv: list[str], *names: str) -> str | None:
    for name, value in _options(argv):
        if name in names:
            return value
    return None


def _call(capsys: pytest.CaptureFixture[str], entry: Any, argv: list[str]) -> tuple[int, str]:
    try:
        status = entry(argv)
    except SystemExit as exc:  # argparse: --help, or a usage error
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    out = capsys.readouterr()
    return status, out.out + out.err


def _expect_ok(command: Command, ran: list[str], status: int, output: str) -> None:
    assert status == 0, (f"{command.where}: exit status {status} from the documented command\n  {command.text}\n"
                         f"checked as: {' '.join(ran)}\n--- output (tail) ---\n{output[-3000:]}")


def _train_args(argv: list[str]) -> list[str]:
    """train.py's arguments from `[python] train.py ARGS`."""
    at = next(i for i, t in enumerate(argv) if t.endswith(("train.py", "train_rlhf.py")))
    return argv[at + 1:]


def _missing_init_from(args: list[str]) -> bool:
    path = _value(args, "--training.init_from", "--init_from")
    return path is not None and not (REPO / path).exists()


def _stack_only(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in RUN_ONLY:
            i += 1 + (RUN_ONLY[name] if "=" not in args[i] else 0)
            continue
        out.append(args[i])
        i += 1
    return out


def _check_training(command: Command, args: list[str], capsys: pytest.CaptureFixture[str], *, rlhf: bool,
                    world: tuple[int, int] | None = None) -> None:
    from ava.cli.main import main, rlhf_entry, train_entry

    args = list(args)
    if world is not None:  # under deepspeed: the launcher's world size, given to the dry run
        gpus, nodes = world
        for flag, n in (("--num_gpus", gpus), ("--num_nodes", nodes)):
            own = _value(args, flag)
            assert own is None or int(own) == n, (
                f"{command.where}: the launcher's {flag} {n} differs from train.py's {flag} {own}\n  {command.text}")
            if own is None and n > 1:
                args += [flag, str(n)]
    if not rlhf and _missing_init_from(args):
        ran = ["config", "validate", *_stack_only(args)]
        status, output = _call(capsys, main, ran)
    else:
        ran = args + ([] if "--dry_run" in args else ["--dry_run"])
        status, output = _call(capsys, rlhf_entry if rlhf else train_entry, ran)
    _expect_ok(command, ran, status, output)
    assert rlhf or "config OK:" in output or ran[0] == "config", output[-2000:]


def _check_ava(command: Command, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from ava.cli.main import main

    if args[:1] == ["train"]:
        return _check_training(command, args[1:], capsys, rlhf=False)
    if args[:1] == ["rlhf"]:
        return _check_training(command, args[1:], capsys, rlhf=True)
    sub = tuple(args[:1]) if args[:1] in (["generate"], ["doctor"]) else tuple(args[:2])
    if sub in HELP_ONLY:
        return _check_by_help(command, args, sub, capsys)
    ran = list(args)
    if sub == ("doctor",) and "--no_launch" not in ran:
        ran.append("--no_launch")
    if sub == ("launch", "slurm"):
        ran = [t for t in ran if t != "--submit"]
    status, output = _call(capsys, main, ran)
    _expect_ok(command, ran, status, output)


def _check_by_help(command: Command, args: list[str], sub: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    from ava.cli.main import main

    ran = [*sub, "--help"]
    status, help_text = _call(capsys, main, ran)
    _expect_ok(command, ran, status, help_text)
    known = set(re.findall(r"--[A-Za-z][\w-]*", help_text))
    unknown = [(name, value) for name, value in _options(args[len(sub):]) if name not in known]
    if "--config" not in known:
        assert not unknown, f"{command.where}: `ava {' '.join(sub)}` has no option {[n for n, _ in unknown]}"
        return
    # A command that takes a config stack: its unknown options are overrides; validate them with the stack.
    stack = [t for name, value in _options(args) if name in STACK_OPTIONS for t in (name, value or "")]
    overrides = [t for name, value in unknown for t in ((name,) if value is None else (name, value))]
    ran = ["config", "validate", *stack, *overrides]
    status, output = _call(capsys, main, ran)
    _expect_ok(command, ran, status, output)


def _check_deepspeed(command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    argv = command.argv
    at = next((i for i, t in enumerate(argv) if t.endswith(".py")), None)
    assert at is not None, f"{command.where}: no script after `deepspeed`\n  {command.text}"
    launcher = argv[1:at]
    hostfile = _value(launcher, "--hostfile")
    assert hostfile is None or (REPO / hostfile).is_file(), f"{command.where}: no hostfile {hostfile}"
    gpus, nodes = int(_value(launcher, "--num_gpus") or 1), int(_value(launcher, "--num_nodes") or 1)
    script = Path(argv[at]).name
    assert script in ("train.py", "train_rlhf.py"), f"{command.where}: deepspeed launches {argv[at]}"
    _check_training(command, argv[at + 1:], capsys, rlhf=script == "train_rlhf.py", world=(gpus, nodes))


def _check_script(command: Command) -> None:
    argv = command.argv[1:] if command.argv[0] in PYTHONS | {"bash", "sh"} else command.argv
    if argv[0] == "-m":
        path, rest = REPO / argv[1].replace(".", "/") / "__main__.py", argv[2:]
    else:
        path, rest = REPO / argv[0], argv[1:]
    assert path.is_file(), f"{command.where}: {path.relative_to(REPO)} does not exist\n  {command.text}"
    text = path.read_text()
    missing = [name for name, _ in _options(rest) if f'"{name}"' not in text and f"{name})" not in text]
    assert not missing, f"{command.where}: {path.relative_to(REPO)} has no option {missing}\n  {command.text}"


def _check_make(command: Command) -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in command.argv[1:]:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{command.where}: no make target {target}"


def _check_sbatch(command: Command) -> None:
    script = next(t for t in reversed(command.argv) if not t.startswith("-"))
    if script.startswith("launch/"):
        assert (REPO / script).is_file(), f"{command.where}: {script} does not exist"
    else:
        assert script in command.written_before, f"{command.where}: no earlier command writes {script}"


@pytest.mark.parametrize("command", CHECKED, ids=_id)
def test_documented_command_runs(command: Command, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    kind = _kind(command.argv)
    if kind == "train":
        _check_training(command, _train_args(command.argv), capsys, rlhf=False)
    elif kind == "rlhf":
        _check_training(command, _train_args(command.argv), capsys, rlhf=True)
    elif kind == "ava":
        at = command.argv.index("ava") + 1 if "ava" in command.argv else 1
        _check_ava(command, command.argv[at:], capsys)
    elif kind == "deepspeed":
        _check_deepspeed(command, capsys)
    elif kind == "script":
        _check_script(command)
    elif kind == "make":
        _check_make(command)
    else:
        _check_sbatch(command)


def test_the_docs_hold_commands_and_few_skips() -> None:
    kinds = [_kind(c.argv) for c in CHECKED]
    assert kinds.count("train") + kinds.count("deepspeed") >= 20 and kinds.count("ava") >= 20, kinds
    assert len(SKIPPED) <= 3, [f"{b.doc.name}:{b.line}" for b in SKIPPED]
    for block in SKIPPED:
        assert block.skip, f"{block.doc.name}:{block.line}: a doc-test skip needs its reason"


def test_the_two_commands_of_the_readme_stay() -> None:
    readme = (REPO / "README.md").read_text()
    assert "```bash\nmake run\n```" in readme and "```bash\nmake test\n```" in readme


# --- Python and YAML blocks ---------------------------------------------------------------------------------------

def _python_blocks() -> list[Block]:
    return [b for doc in DOCS for b in _blocks(doc) if b.lang == "python" and b.skip is None]


class _Summary(dict):
    """summary.json as a stand-in run returns it: any key that summary.py writes."""

    def __missing__(self, key: str) -> float:
        source = (REPO / "ava" / "train" / "report" / "summary.py").read_text()
        assert f'"{key}"' in source, f"summary.json has no key {key!r} (ava/train/report/summary.py)"
        return 1.0


def _stand_in_run(resolved: Any, *, output_dir: Any = None, callbacks: Any = (), **kwargs: Any) -> Any:
    """Drive each callback through the hooks a real run calls, with records shaped like a real run's."""
    from ava.config.loader import ResolvedConfig
    from ava.train.runner import RunOutcome
    from ava.train.trainer.callback import Callback, CallbackList

    assert isinstance(resolved, ResolvedConfig)
    hooks = {name: inspect.signature(getattr(Callback, name)) for name in vars(Callback)
             if callable(getattr(Callback, name)) and not name.startswith("_")}
    for callback in callbacks:
        assert isinstance(callback, Callback)
        for name, member in vars(type(callback)).items():
            if callable(member) and not name.startswith("_"):
                assert name in hooks, f"{type(callback).__name__}.{name} is not a Callback hook"
                own = list(inspect.signature(member).parameters)
                assert len(own) == len(hooks[name].parameters), f"{name}{inspect.signature(member)} != {hooks[name]}"
    listed = CallbackList(callbacks)
    listed.on_train_start(None)  # type: ignore[arg-type]
    for record in ({"step": 10, "loss": 3.2, "lm_loss": 3.1, "lr": 1e-3},
                   {"step": 10, "eval_loss": 3.0, "eval_perplexity": 20.1, "best_eval_loss": 3.0},
                   {"step": 20, "eval_loss": 2.8, "eval_perplexity": 16.4, "best_eval_loss": 2.8}):
        listed.on_log(None, record)  # type: ignore[arg-type]
    state = listed.state_dict()
    fresh = CallbackList([type(c)() for c in callbacks])
    fresh.load_state_dict({"callbacks": state})
    assert fresh.state_dict() == state  # what a resumed run gives back
    listed.on_train_end(None)  # type: ignore[arg-type]
    return RunOutcome("completed", Path(output_dir or "outputs/x"), None, _Summary())  # type: ignore[arg-type]


@pytest.mark.parametrize("block", _python_blocks(), ids=lambda b: f"{b.doc.relative_to(REPO)}:{b.line}")
def test_documented_python_runs(block: Block, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code = compile(block.text, f"{block.doc.name}:{block.line}", "exec")
    if "ava.train" not in block.text:
        return
    import ava.train.runner

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ava.train.runner, "run", _stand_in_run)
    exec(code, {"__name__": "doc_example"})
    if "Callback)" in block.text:
        assert "new best 2.8000 at step 20" in capsys.readouterr().out


@pytest.mark.parametrize("block", [b for doc in DOCS for b in _blocks(doc) if b.lang == "yaml" and b.skip is None],
                         ids=lambda b: f"{b.doc.relative_to(REPO)}:{b.line}")
def test_documented_yaml_is_a_valid_config_layer(block: Block, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ava.config import ConfigFiles, WorldSize, load_config

    monkeypatch.chdir(REPO)
    layer = tmp_path / "layer.yaml"
    layer.write_text(block.text)
    load_config(ConfigFiles("configs/gpu/tiny.yaml", str(layer)), (), WorldSize(1, "doc test"))


# --- links and tables of contents ---------------------------------------------------------------------------------

def _headings(doc: Path) -> list[tuple[int, str]]:
    """(level, GitHub anchor) of every heading outside code blocks."""
    seen: dict[str, int] = {}
    out: list[tuple[int, str]] = []
    in_fence = False
    for line in doc.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if in_fence or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(2).strip().lower()).replace(" ", "-")
        out.append((len(heading.group(1)), slug if slug not in seen else f"{slug}-{seen[slug]}"))
        seen[slug] = seen.get(slug, 0) + 1
    return out


def _anchors(doc: Path) -> set[str]:
    return {slug for _, slug in _headings(doc)}


def _links(doc: Path) -> list[tuple[int, str]]:
    out, in_fence = [], False
    for number, line in enumerate(doc.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence:
            out += [(number, target) for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for number, target in _links(doc):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{doc.name}:{number}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{doc.name}:{number}: {target} (no such heading in {file.name})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", [d for d in DOCS if d.parent.name == "docs" and d.name != "README.md"],
                         ids=lambda d: d.name)
def test_every_guide_opens_with_a_table_of_contents(doc: Path) -> None:
    text = doc.read_text()
    head = text[:text.index("\n## ")]
    listed = {target[1:] for target in re.findall(r"\]\((#[^)\s]+)\)", head)}
    sections = {slug for level, slug in _headings(doc) if level == 2}
    assert sections and sections <= listed, f"{doc.name}: sections missing from its contents: {sections - listed}"

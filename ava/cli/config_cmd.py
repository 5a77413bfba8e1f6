"""`ava config show | explain | validate | deepspeed | diff | schema`."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ava.cli.args import Stack, add_stack_arguments, new_parser, stack_from
from ava.cli.stack_report import memory_verdict, model_shape_notice
from ava.config import ConfigError, ConfigFiles, Problem, WorldSize, build_deepspeed_config, keys, load_config
from ava.config.aliases import alias_of
from ava.config.loader import ResolvedConfig, shipped_configs_dir
from ava.config.render import explain, render_yaml, scalar
from ava.config.schema import AvaConfig
from ava.errors import UserError
from ava.model.memory_estimate import size_text
from ava.model.memory_fit import MemoryVerdict
from ava.secrets import redact_text, secret_values


def _load(stack: Stack) -> ResolvedConfig:
    resolved = load_config(stack.files, stack.overrides, stack.world)
    for notice in resolved.notices:
        print(redact_text(notice.render(), secret_values()), file=sys.stderr)
    return resolved


def show(argv: Sequence[str]) -> int:
    parser = new_parser("ava config show", "Print the resolved configuration as YAML.")
    add_stack_arguments(parser)
    parser.add_argument("--explain", action="store_true", help="annotate every value with where it came from")
    ns, extras = parser.parse_known_args(argv)
    resolved = _load(stack_from(ns, extras))
    for line in model_shape_notice(resolved):  # stderr, like the notices: stdout stays YAML that loads back
        print(f"note: {line}", file=sys.stderr)
    sys.stdout.write(render_yaml(resolved, with_origins=ns.explain))
    return 0


def explain_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava config explain", "Explain one key: its value, origin and every layer that set it.")
    parser.add_argument("key", help="dotted key (training.batch_size) or flat name (batch_size)")
    add_stack_arguments(parser)
    ns, extras = parser.parse_known_args(argv)
    path = _key_path(ns.key)
    resolved = _load(stack_from(ns, extras))
    print(explain(resolved, path))
    return 0


def _key_path(name: str) -> tuple[str, ...]:
    path = tuple(name.split("."))
    if keys.lookup(path):
        return path
    if "." not in name:
        matches = tuple(dict.fromkeys(alias_of(p) or p for p in keys.flat_names().get(name, ())))
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ConfigError([Problem("command line", name, "ambiguous key name: it could mean "
                                       + " or ".join(".".join(m) for m in matches), "give the dotted name")])
    close = keys.suggest(name, [".".join(p) for p in keys.leaf_keys()] + list(keys.flat_names()))
    raise ConfigError([Problem("command line", name, "unknown key",
                               ("did you mean " + " or ".join(close) + "?") if close
                               else "run `ava config show --config FILE` to see every key")])


def deepspeed_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava config deepspeed", "Print the DeepSpeed JSON generated from the configuration.")
    add_stack_arguments(parser)
    ns, extras = parser.parse_known_args(argv)
    resolved = _load(stack_from(ns, extras))
    print(json.dumps(build_deepspeed_config(resolved.config), indent=2))
    return 0


def schema_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava config schema", "Print the JSON Schema of Ava config files (for editors).")
    parser.parse_args(argv)
    schema = AvaConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ava configuration"
    print(json.dumps(schema, indent=2))
    return 0


def diff_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava config diff", "Compare two base configs resolved with the same other layers.")
    parser.add_argument("a", help="first base config")
    parser.add_argument("b", help="second base config")
    add_stack_arguments(parser)
    ns, extras = parser.parse_known_args(argv)
    stack = stack_from(ns, extras)
    results: list[ResolvedConfig] = []
    problems: list[Problem] = []
    for path in (ns.a, ns.b):
        files = ConfigFiles(path, stack.files.hardware_config, stack.files.distributed_config,
                            stack.files.rlhf_config)
        try:
            results.append(load_config(files, stack.overrides, stack.world))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    a, b = (_flatten(r.to_dict()) for r in results)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not changed:
        print(f"no differences: {ns.a} and {ns.b} resolve to the same configuration")
        return 0
    width = max(len(".".join(k)) for k in changed)
    print(f"{len(changed)} key(s) differ   ({ns.a}  ->  {ns.b})")
    secrets = secret_values()
    for k in changed:
        ra, rb = results[0].origin(k).where(), results[1].origin(k).where()
        print(redact_text(f"  {'.'.join(k):<{width}}  {scalar(a.get(k))} [{ra}]  ->  {scalar(b.get(k))} [{rb}]",
                          secrets))
    return 0


def _flatten(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def validate_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava config validate",
                        "Validate a configuration stack, or (with no --config) every shipped combination.")
    add_stack_arguments(parser)
    parser.add_argument("--all", action="store_true",
                        help="validate every shipped gpu x hardware x distributed combination, and every recipe")
    parser.add_argument("--world_sizes", default="1,2,4,8", help="data-parallel sizes for --all (default 1,2,4,8)")
    parser.add_argument("--configs_dir", default=None, help="where the shipped configs are (default: the repo's configs/)")
    parser.add_argument("--force", action="store_true",
                        help="a stack estimated not to fit hardware.memory_gb is a warning, not an error")
    ns, extras = parser.parse_known_args(argv)
    if ns.config and not ns.all:
        return _validate_one(stack_from(ns, extras), ns.force)
    return _validate_all(ns, extras)


def _validate_one(stack: Stack, force: bool) -> int:
    """Validate one stack, then hold its estimated memory per device to hardware.memory_gb (an error unless forced)."""
    resolved = _load(stack)
    for line in model_shape_notice(resolved):
        print(f"note: {line}", file=sys.stderr)
    memory = memory_verdict(resolved)
    # An RLHF stage holds more models than the one the estimate counts (reference, reward, critic): no verdict.
    rlhf = resolved.files.rlhf_config is not None
    problem = None if rlhf else memory.problem()
    if problem is not None and not force:
        raise UserError(problem[0], problem[1] + "; or pass --force to accept the estimate")
    b = resolved.batch
    print(f"valid: {', '.join(p for _, p, _ in resolved.files.layers())}"
          f"{' + ' + str(len(resolved.overrides)) + ' override token(s)' if resolved.overrides else ''}\n"
          f"  batch: micro {b.micro} x accumulation {b.accumulation} x {b.world.size} rank(s) "
          f"= global {b.global_batch}  [{b.world.source}]\n  {memory.line()}"
          + (" (one model: an RLHF stage's reference, reward and critic models come on top)" if rlhf else ""))
    if problem is not None:
        print(f"WARNING (--force): {memory.warning()}", file=sys.stderr)
    return 0


def _validate_all(ns: argparse.Namespace, extras: Sequence[str]) -> int:
    root = Path(ns.configs_dir) if ns.configs_dir else shipped_configs_dir()
    if not (root / "gpu").is_dir():
        raise ConfigError([Problem(str(root), "", "no shipped configs found (expected a gpu/ folder here)",
                                   "run from the Ava checkout or pass --configs_dir PATH/TO/configs")])
    try:
        worlds = [int(w) for w in ns.world_sizes.split(",") if w.strip()]
        if not worlds or min(worlds) < 1:
            raise ValueError
    except ValueError:
        raise ConfigError([Problem("command line (--world_sizes)", "", f"not a list of positive integers: {ns.world_sizes!r}",
                                   "write e.g. --world_sizes 1,2,8")]) from None
    gpus = sorted(root.glob("gpu/*.yaml"))
    hardware: list[Path | None] = [None, *sorted(root.glob("hardware/*.yaml"))]
    distributed: list[Path | None] = [None, *sorted(root.glob("distributed/*.yaml"))]
    combos: list[tuple[Path, Path | None, Path | None, Path | None]] = [
        (g, h, d, None) for g, h, d in itertools.product(gpus, hardware, distributed)]
    combos += [(g, None, None, r) for g in gpus for r in sorted(root.glob("rlhf/*.yaml"))]
    # Recipes carry their own hardware and ZeRO settings: each is validated as the one file it is run as.
    combos += [(recipe, None, None, None) for recipe in sorted(root.glob("recipes/*/*.yaml"))]
    # Research configs are tiny experiments, validated as their headers run them: alone and with hardware/cpu.yaml.
    combos += [(c, h, None, None) for c in sorted(root.glob("research/*.yaml"))
               for h in [None, *root.glob("hardware/cpu.yaml")]]
    failures: list[tuple[str, int, ConfigError]] = []
    batch_only: dict[str, list[tuple[int, ConfigError]]] = {}  # recipes: world sizes their fixed batch cannot take
    passed: set[str] = set()
    memory: dict[str, list[tuple[int, MemoryVerdict]]] = {}
    checked = 0
    for (g, h, d, r), world in itertools.product(combos, worlds):
        files = ConfigFiles(*(str(p) if p else None for p in (g, h, d, r)))
        label = " + ".join(p.relative_to(root).as_posix() for p in (g, h, d, r) if p)
        checked += 1
        try:
            resolved = load_config(files, tuple(extras), WorldSize(world, f"--world_sizes {world}"))
        except ConfigError as exc:
            if label.startswith("recipes/") and all(p.key == "batch size" for p in exc.problems):
                batch_only.setdefault(label, []).append((world, exc))
            else:
                failures.append((label, world, exc))
            continue
        passed.add(label)
        if resolved.config.hardware.memory_gb is not None and r is None:  # RLHF: more models than the estimate
            verdict = memory_verdict(resolved, with_fixes=False)
            if verdict.fits is False:
                memory.setdefault(label, []).append((world, verdict))
    # A recipe is one run for one machine and may fix its global batch for it: a world size that batch cannot
    # be split over is one the recipe is not for (said here), unless it fits none of them (then it fails).
    skipped = 0
    for label, misses in batch_only.items():
        if label not in passed:
            failures += [(label, world, error) for world, error in misses]
            continue
        skipped += len(misses)
        print(f"SKIP  {label}  (world size {','.join(str(w) for w, _ in misses)}): not a world size this recipe "
              f"is for: {misses[0][1].problems[0].message}")
    for label, world, error in failures:
        print(f"FAIL  {label}  (world size {world})")
        for problem in error.problems:
            print(f"        {problem.render()}")
    for label, verdicts in memory.items():
        name = verdicts[0][1].estimate.largest[0]
        sizes = ", ".join(f"{size_text(v.estimate.total)} at {w}" for w, v in verdicts)
        print(f"MEMORY  {label}: estimated {sizes} rank(s) per device, over hardware.memory_gb "
              f"{verdicts[0][1].memory_gb:g} GiB (largest term: {name})")
    valid = checked - skipped
    print(f"{valid - len(failures)}/{valid} shipped combinations valid "
          f"({len(combos)} stacks x world sizes {','.join(map(str, worlds))}) in {root}"
          + (f"; {skipped} skipped (recipes, at world sizes they are not for)" if skipped else ""))
    if memory:
        print(f"{len(memory)} stack(s) estimated not to fit their hardware.memory_gb at some world size: warnings, "
              "not failures (a model config of another size on that preset); `ava config validate --config ...` "
              "shows the fixes")
    return 2 if failures else 0


COMMANDS = {
    "show": show,
    "explain": explain_cmd,
    "validate": validate_cmd,
    "deepspeed": deepspeed_cmd,
    "diff": diff_cmd,
    "schema": schema_cmd,
}

"""Compose base -> hardware -> distributed -> rlhf -> command line into one validated config.

This is the only entry point the rest of Ava uses: it returns an immutable
`ResolvedConfig` (the pydantic config, the origin of every value, the solved
batch plan and the notices to show) or raises one `ConfigError` holding every
problem found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ava.config.aliases import fill_aliases, resolve_aliases
from ava.config.batch import BatchPlan, WorldSize
from ava.config.check_context import CheckContext
from ava.config.checks import run_checks
from ava.config.errors import ConfigError, Notice, Problem
from ava.config.init_from import adopt_pretrained
from ava.config.merge import Leaf, MergedTree, merge, yaml_leaves
from ava.config.overrides import resolve_overrides, split_overrides
from ava.config.provenance import DEFAULT_ORIGIN, Assignment, Layer, Origin
from ava.config.schema import AvaConfig
from ava.config.validate import validate_sections
from ava.config.yaml_loader import KeyPath, load_yaml_file

_ROLES = (("config", Layer.BASE), ("hardware_config", Layer.HARDWARE),
          ("distributed_config", Layer.DISTRIBUTED), ("rlhf_config", Layer.RLHF))


@dataclass(frozen=True)
class ConfigFiles:
    """The YAML files of one run, by role."""

    config: str | None = None
    hardware_config: str | None = None
    distributed_config: str | None = None
    rlhf_config: str | None = None

    def layers(self) -> list[tuple[str, str, Layer]]:
        return [(role, path, layer) for role, layer in _ROLES
                if (path := getattr(self, role)) is not None]


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated configuration and everything known about where it came from."""

    config: AvaConfig
    origins: dict[KeyPath, Origin]
    history: dict[KeyPath, list[Assignment]]
    batch: BatchPlan
    notices: list[Notice]
    files: ConfigFiles
    overrides: tuple[str, ...] = ()
    _data: dict[str, Any] = field(default_factory=dict, repr=False)

    def origin(self, path: KeyPath | str) -> Origin:
        key = tuple(path.split(".")) if isinstance(path, str) else path
        return self.origins.get(key, DEFAULT_ORIGIN)

    def to_dict(self) -> dict[str, Any]:
        """The resolved values, every alias filled in; loading this back gives the same config."""
        import copy

        return copy.deepcopy(self._data)


def load_config(files: ConfigFiles, overrides: Sequence[str] = (),
                world: WorldSize | None = None) -> ResolvedConfig:
    """Load, merge, validate and check a configuration stack."""
    world = world or WorldSize.detect()
    problems: list[Problem] = []
    layers: list[list[Leaf]] = []

    if files.config is None:
        problems.append(Problem("command line", "--config", "no base config given",
                                "pass --config configs/gpu/tiny.yaml (or another file from configs/gpu/)"))
    for role, path, layer in files.layers():
        try:
            # The base config must set something: empty, it would train the schema's defaults (a 1.95B model);
            # an empty hardware, distributed or RLHF layer only adds nothing.
            layers.append(list(yaml_leaves(load_yaml_file(path, role=f"--{role}", must_set=role == "config"), layer)))
        except ConfigError as exc:
            problems.extend(exc.problems)

    unreadable = bool(problems)  # a file that could not be read leaves nothing to validate
    raw, split_problems = split_overrides(list(overrides))
    cli_leaves, override_problems = resolve_overrides(raw)
    problems += split_problems + override_problems
    if unreadable:
        raise ConfigError(problems)
    # A bad override is left out and the rest is still validated, so the files' own problems show in the same run.
    layers.append(cli_leaves)

    tree = merge(layers)
    if files.rlhf_config is not None and "rlhf" not in tree.data:
        tree.data["rlhf"] = {}
    problems += resolve_aliases(tree)
    sections, section_problems, notices = validate_sections(tree)
    problems += section_problems
    adopt_problems, adopt_notices = adopt_pretrained(sections, tree.origins)  # before the checks judge the model
    problems += adopt_problems
    notices += adopt_notices

    ctx = run_checks(CheckContext(sections, dict(tree.origins), world))
    problems += ctx.problems
    notices += ctx.notices
    if problems or ctx.batch is None:
        raise ConfigError(problems or [Problem("", "", "internal error: batch plan missing")])
    return _finish(sections, tree, ctx.origins, ctx.batch, notices, files, tuple(overrides))


def _finish(sections: dict[str, Any], tree: MergedTree, checked: dict[KeyPath, Origin], plan: BatchPlan,
            notices: list[Notice], files: ConfigFiles, overrides: tuple[str, ...]) -> ResolvedConfig:
    """The resolved config: the checked sections (a check may have re-derived a value, e.g. a warmup that
    did not fit the run) with the batch plan, and `checked`, the origins as the checks left them."""
    data: dict[str, Any] = {name: (s.model_dump(mode="json") if s is not None else None)
                            for name, s in sections.items()}
    origins = dict(checked)
    data["training"]["batch_size"] = plan.micro
    data["training"]["gradient_accumulation_steps"] = plan.accumulation
    data["deepspeed"]["train_batch_size"] = plan.global_batch
    for name, path in (("micro", ("training", "batch_size")),
                       ("accumulation", ("training", "gradient_accumulation_steps")),
                       ("global", ("deepspeed", "train_batch_size"))):
        if plan.origins.get(name, DEFAULT_ORIGIN).layer is not Layer.DEFAULT:
            origins[path] = plan.origins[name]
    fill_aliases(data, origins)
    data["deepspeed"]["fp8_enabled"] = data["training"]["mixed_precision"] == "fp8"
    origins[("deepspeed", "fp8_enabled")] = origins.get(("training", "mixed_precision"), DEFAULT_ORIGIN)
    if data.get("rlhf") is None:
        data.pop("rlhf", None)
    config = AvaConfig.model_validate(data)
    return ResolvedConfig(config, origins, tree.history, plan, notices, files, overrides, data)


def with_accumulation(resolved: ResolvedConfig, global_batch: int, why: str) -> ResolvedConfig | None:
    """`resolved` with the global batch `global_batch` on the same ranks and micro batch, the gradient
    accumulation re-derived (`why` says where the global batch comes from); None when no accumulation makes it.

    For a resume on another number of ranks: the checkpoint's global batch
    outranks every layer, and only accumulation may move to meet it.
    """
    import dataclasses

    b = resolved.batch
    per_step = b.micro * b.world.size
    if global_batch % per_step:
        return None
    accumulation = global_batch // per_step
    origins = dict(resolved.origins)
    plan_origins = dict(b.origins)
    plan_origins["global"] = Origin(Layer.DERIVED, detail=why)
    plan_origins["accumulation"] = Origin(
        Layer.DERIVED, detail=f"global {global_batch} / (micro {b.micro} x {b.world.size} rank(s))")
    plan = BatchPlan(b.micro, accumulation, global_batch, b.world, plan_origins, list(b.notices))
    data = resolved.to_dict()
    data["training"]["gradient_accumulation_steps"] = accumulation
    data["deepspeed"]["train_batch_size"] = global_batch
    origins[("training", "gradient_accumulation_steps")] = plan_origins["accumulation"]
    origins[("deepspeed", "train_batch_size")] = plan_origins["global"]
    fill_aliases(data, origins)
    return dataclasses.replace(resolved, config=AvaConfig.model_validate(data), origins=origins, batch=plan,
                               _data=data)


def shipped_configs_dir() -> Path:
    """The repository's configs/ directory (beside the ava package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "configs"

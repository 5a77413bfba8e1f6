"""The one batch-size solver.

Three numbers describe a batch: the per-device micro batch
(`training.batch_size`), the gradient accumulation steps, and the global batch
(`deepspeed.train_batch_size`), tied by

    global = micro x accumulation x data-parallel world size.

Any two determine the third.  When all three are given and disagree, the one
set in a strictly lower-precedence layer is recomputed -- accumulation first,
then global -- so that, e.g., a distributed config that fixes the global batch
keeps it on any GPU count by adjusting accumulation, and the user is told.
The micro batch is recomputed only when no file or flag set it: it is the
number that decides device memory, and raising it on the user's behalf (a
global batch of 1001 over a micro batch of 8 would give a micro batch of 1001)
is an out-of-memory error waiting on a GPU.  Otherwise it is one error naming
every source and listing the nearest valid combinations.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ava.config.errors import Notice, Problem
from ava.config.provenance import DEFAULT_ORIGIN, Layer, Origin


@dataclass(frozen=True)
class WorldSize:
    """Data-parallel ranks and where that number came from."""

    size: int
    source: str

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None, num_gpus: int | None = None,
               num_nodes: int | None = None) -> WorldSize:
        """From the launcher's WORLD_SIZE, else --num_gpus x --num_nodes (a dry run), else 1.

        `--num_gpus` counts GPUs per node, as the deepspeed launcher does.
        """
        env = os.environ if env is None else env
        raw = env.get("WORLD_SIZE")
        if raw and raw.strip().isdigit() and int(raw) > 0:
            return cls(int(raw), "environment WORLD_SIZE (set by the launcher)")
        if num_gpus is not None or num_nodes is not None:
            for flag, value in (("--num_gpus", num_gpus), ("--num_nodes", num_nodes)):
                if value is not None and value < 1:
                    from ava.config.errors import ConfigError, Problem

                    raise ConfigError([Problem(f"command line ({flag} {value})", flag,
                                               "must be at least 1", f"pass {flag} 1 or more")])
            gpus, nodes = num_gpus or 1, num_nodes or 1
            return cls(gpus * nodes, f"--num_gpus {gpus} x --num_nodes {nodes}")
        return cls(1, "default: a single process (no launcher, no --num_gpus)")


@dataclass(frozen=True)
class BatchValue:
    """One of the three batch numbers with its origin."""

    key: str
    value: int | None
    origin: Origin = DEFAULT_ORIGIN

    def given(self) -> bool:
        return self.value is not None and self.origin.layer is not Layer.DEFAULT

    def describe(self) -> str:
        shown = self.origin.key or self.key
        return f"{shown} = {self.value} ({self.origin.where()})"


@dataclass
class BatchPlan:
    """The solved batch configuration."""

    micro: int
    accumulation: int
    global_batch: int
    world: WorldSize
    origins: dict[str, Origin] = field(default_factory=dict)  # "micro"/"accumulation"/"global"
    notices: list[Notice] = field(default_factory=list)

    def sequences_per_step(self) -> int:
        return self.global_batch

    def tokens_per_step(self, sequence_length: int) -> int:
        return self.global_batch * sequence_length


_ORDER = {"accumulation": 0, "micro": 1, "global": 2}


def solve_batch(micro: BatchValue, accumulation: BatchValue, global_batch: BatchValue,
                world: WorldSize) -> tuple[BatchPlan | None, list[Problem]]:
    """Return the consistent batch plan, or the problem that prevents one."""
    assert micro.value is not None and accumulation.value is not None
    w = world.size
    values = {"micro": micro, "accumulation": accumulation, "global": global_batch}
    origins = {name: v.origin for name, v in values.items()}

    if global_batch.value is None:
        g = micro.value * accumulation.value * w
        origins["global"] = _derived(f"micro {micro.value} x accumulation {accumulation.value} x {w} rank(s)")
        return BatchPlan(micro.value, accumulation.value, g, world, origins), []

    g = global_batch.value
    if micro.value * accumulation.value * w == g:
        return BatchPlan(micro.value, accumulation.value, g, world, origins), []

    top = max(v.origin.layer for v in values.values())
    candidates = sorted((name for name, v in values.items()
                         if v.origin.layer < top and not (name == "micro" and v.given())),
                        key=lambda n: (values[n].origin.layer, _ORDER[n]))
    for name in candidates:
        plan = _rederive(name, micro.value, accumulation.value, g, w)
        if plan is None:
            continue
        m, a, gg = plan
        old = values[name]
        explanation = {
            "accumulation": f"global {g} / (micro {m} x {w} rank(s))",
            "micro": f"global {g} / (accumulation {a} x {w} rank(s))",
            "global": f"micro {m} x accumulation {a} x {w} rank(s)",
        }[name]
        new_value = {"accumulation": a, "micro": m, "global": gg}[name]
        origins[name] = _derived(explanation + f"; replaces {old.describe()}")
        keep = ", ".join(values[n].describe() for n in values if n != name)
        notice = Notice("note", "", values[name].key,
                        f"set to {new_value} (was {old.value} from {old.origin.where()}) so that "
                        f"{keep} hold with {w} data-parallel rank(s) [{world.source}]")
        return BatchPlan(m, a, gg, world, origins, [notice]), []

    return None, [_inconsistent(micro, accumulation, global_batch, world)]


def _rederive(name: str, m: int, a: int, g: int, w: int) -> tuple[int, int, int] | None:
    if name == "accumulation":
        return (m, g // (m * w), g) if g % (m * w) == 0 else None
    if name == "micro":
        return (g // (a * w), a, g) if g % (a * w) == 0 else None
    return m, a, m * a * w


def _derived(detail: str) -> Origin:
    return Origin(Layer.DERIVED, detail=detail)


def _inconsistent(micro: BatchValue, acc: BatchValue, glob: BatchValue, world: WorldSize) -> Problem:
    m, a, g, w = micro.value, acc.value, glob.value, world.size
    assert m is not None and a is not None and g is not None
    message = (f"inconsistent batch sizes: the global batch {glob.describe()} must equal "
               f"micro batch {micro.describe()} x gradient accumulation {acc.describe()} x "
               f"{w} data-parallel rank(s) [{world.source}] = {m * a * w}")
    return Problem(glob.origin.where(), "batch size", message,
                   "use one of the nearest valid combinations: " + "; ".join(nearest_combinations(m, a, g, w))
                   + f"; or remove {glob.origin.key or glob.key} to let it follow micro x accumulation x ranks")


def nearest_combinations(m: int, a: int, g: int, w: int, limit: int = 4) -> list[str]:
    """Valid (micro, accumulation, global) triples close to what was asked, as text."""
    found: list[tuple[int, int, int]] = []

    def add(mm: int, aa: int) -> None:
        if mm >= 1 and aa >= 1 and (mm, aa, mm * aa * w) not in found:
            found.append((mm, aa, mm * aa * w))

    if g % w == 0:  # keep the global batch exactly
        per_rank = g // w
        if per_rank % m == 0:
            add(m, per_rank // m)
        if per_rank % a == 0 and per_rank // a <= 4 * m:  # a far larger micro batch is no suggestion
            add(per_rank // a, a)
        window = range(max(1, m // 4), min(per_rank, 4 * m) + 1)  # near the requested micro batch only
        divisors = [d for d in window if per_rank % d == 0]
        for d in sorted(divisors, key=lambda d: (abs(d - m), d))[:2]:
            add(d, per_rank // d)
    for aa in sorted({max(1, g // (m * w)), max(1, -(-g // (m * w)))}):
        add(m, aa)  # keep the micro batch, global as close as possible
    add(m, a)  # keep micro and accumulation; the global follows
    return [f"micro {mm} x accumulation {aa} x {w} rank(s) = global {gg}" for mm, aa, gg in found[:limit]]

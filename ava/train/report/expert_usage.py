"""MoE expert utilisation over a run, and capacity-overflow warnings, read from metrics records.

What MoE users watch ("expert utilisation", "capacity overflow"), computed
from the keys the trainer logs on logging steps (`ava.model.moe.metrics`):
`moe/layer{i}/load/expert{e}` (assignments expert e of layer i got in the
step's last micro batch, before the capacity limit) and
`moe/layer{i}/dropped_fraction`. Pure: it takes records, so it serves the
end-of-run summary (from metrics.jsonl) and the live loop (`OverflowWatch`).

A layer's shares are its load counts summed over all logged steps and
normalised, so every logged step weighs by its tokens. The warnings:

- capacity overflow: a layer's mean dropped fraction above the threshold.
  Dropped assignments skip that expert's FFN, so the tokens lose computation.
  A dropless layer (capacity factor None or 0) drops nothing and never warns.
- under-used expert: a share below a quarter of the even share 1/E; the
  router starves it, so its parameters barely train.
- imbalance: the busiest expert above twice the even share. Top-k is not
  in the records, but it needs no special case: an expert takes at most one
  of a token's k assignments, so its share is at most 1/k, and when E <= 2k
  (top-2 of 2 experts: always 50% each) the rule cannot fire.

Each kind gives at most one line however many layers it hits, listing them
("layers 0-2, 5 dropped 2.1-4.0% ..."), so a 24-layer model does not flood
the summary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

OVERFLOW_WARN_FRACTION = 0.01   # share of assignments dropped above which Ava warns
UNDER_USED_SHARE = 0.25         # an expert below this multiple of the even share is under-used
IMBALANCED_SHARE = 2.0          # a busiest expert above this multiple of the even share is an imbalance
MAX_LISTED_LAYERS = 6           # under-used experts: layers listed by name before "and N more layers"
TABLE_HEADER = ("layer", "min share", "max share", "busiest expert", "dropped")

_LOAD_KEY = re.compile(r"^moe/layer(\d+)/load/expert(\d+)$")
_DROPPED_KEY = re.compile(r"^moe/layer(\d+)/dropped_fraction$")
_ROUTER_ADVICE = "Raise model.router_aux_loss_coef or use model.router_type aux_loss_free."


@dataclass(frozen=True)
class LayerUsage:
    """How one MoE layer spread its assignments over the run."""

    layer: int
    shares: list[float]      # each expert's share of the layer's assignments over the run (sums to 1)
    dropped_fraction: float  # mean over logged steps

    @property
    def busiest(self) -> int:
        """Index of the expert with the largest share (the lowest index on a tie)."""
        return max(range(len(self.shares)), key=self.shares.__getitem__)


@dataclass(frozen=True)
class ExpertUsageReport:
    """Per-layer utilisation and the warnings it gives rise to."""

    layers: list[LayerUsage]
    steps: int               # logged steps it was computed from
    warnings: list[str]

    def as_dict(self) -> dict:
        """Plain JSON-ready dict, for summary.json."""
        return asdict(self)

    def table_rows(self) -> list[tuple[str, ...]]:
        """One row per layer, columns as TABLE_HEADER: layer, min share %, max share %, busiest expert, dropped %."""
        return [(str(u.layer), _pct(min(u.shares)), _pct(max(u.shares)), str(u.busiest), _pct(u.dropped_fraction))
                for u in self.layers]


def expert_usage(records: Iterable[dict], capacity_factor: float | None, *,
                 threshold: float = OVERFLOW_WARN_FRACTION) -> ExpertUsageReport | None:
    """Utilisation report of an MoE run; None when the records hold no expert loads (a dense model).

    `capacity_factor` is model.expert_capacity_factor (None or 0: dropless,
    no overflow warning); `threshold` is the mean dropped fraction above
    which a layer is warned about.
    """
    by_step: dict[int, dict] = {}
    for record in records:  # the last record wins a step logged twice (resume, rollback)
        if type(record.get("step")) is int and any(_LOAD_KEY.match(key) for key in record):
            by_step[record["step"]] = record
    counts: dict[int, dict[int, float]] = {}
    dropped: dict[int, list[float]] = {}
    for record in by_step.values():
        for key, value in record.items():
            number = _finite(value)
            if number is None or number < 0:
                continue
            if match := _LOAD_KEY.match(key):
                experts = counts.setdefault(int(match[1]), {})
                experts[int(match[2])] = experts.get(int(match[2]), 0.0) + number
            elif match := _DROPPED_KEY.match(key):
                dropped.setdefault(int(match[1]), []).append(number)
    layers = []
    for layer in sorted(counts):
        total = sum(counts[layer].values())
        if total <= 0:
            continue
        shares = [counts[layer].get(e, 0.0) / total for e in range(max(counts[layer]) + 1)]
        drops = dropped.get(layer, [])
        layers.append(LayerUsage(layer, shares, sum(drops) / len(drops) if drops else 0.0))
    if not layers:
        return None
    warnings = [w for w in (_overflow_warning(layers, capacity_factor, threshold), _under_used_warning(layers),
                            _imbalance_warning(layers)) if w]
    return ExpertUsageReport(layers, len(by_step), warnings)


class OverflowWatch:
    """Live overflow warning while training.

    `check` returns a message the first time a logged step drops more than
    the threshold, and again only when the dropped share has doubled since
    the last warning. The dropped share of a step is its worst layer's, so
    one overflowing layer is not averaged away by the others; once per
    doubling keeps a steadily overflowing run from repeating itself.
    """

    def __init__(self, capacity_factor: float | None, threshold: float = OVERFLOW_WARN_FRACTION) -> None:
        self.capacity_factor = capacity_factor
        self.threshold = threshold
        self.warned_at: float | None = None  # the dropped share of the last warning

    def check(self, record: dict) -> str | None:
        """The warning for this training record, or None."""
        if not self.capacity_factor:
            return None
        per_layer = {int(m[1]): v for key, value in record.items()
                     if (m := _DROPPED_KEY.match(key)) and (v := _finite(value)) is not None}
        mean = _finite(record.get("moe/dropped_fraction"))
        worst = max(per_layer.values(), default=mean)
        if worst is None or worst <= self.threshold:
            return None
        if self.warned_at is not None and worst < 2 * self.warned_at:
            return None
        self.warned_at = worst
        over = {layer: share for layer, share in per_layer.items() if share > self.threshold}
        subject = _layers_text(sorted(over)) if over else "the MoE layers"
        message = _overflow_sentence(subject, list(over.values()) or [worst], self.capacity_factor)
        return f"step {record.get('step')}: {message} (Warned again only if the dropped share doubles.)"


def _overflow_warning(layers: list[LayerUsage], capacity_factor: float | None, threshold: float) -> str | None:
    over = [u for u in layers if u.dropped_fraction > threshold]
    if not capacity_factor or not over:
        return None
    return _overflow_sentence(_layers_text([u.layer for u in over]), [u.dropped_fraction for u in over],
                              capacity_factor)


def _overflow_sentence(subject: str, dropped: list[float], capacity_factor: float) -> str:
    # A smaller micro batch would not help: capacity scales with the batch, and fewer tokens
    # make the per-expert counts relatively noisier, so more of them spill over.
    suggested = 2.0 if capacity_factor < 2.0 else float(math.ceil(2 * capacity_factor))
    return (f"{subject} dropped {_pct_range(dropped)} of token assignments at model.expert_capacity_factor "
            f"{capacity_factor:g}: those tokens skip the FFN. Raise model.expert_capacity_factor "
            f"(e.g. {suggested:.1f}) or set it to 0 (dropless), or balance the router with a higher "
            "model.router_aux_loss_coef.")


def _under_used_warning(layers: list[LayerUsage]) -> str | None:
    starved = [(u, [e for e, share in enumerate(u.shares) if share < UNDER_USED_SHARE / len(u.shares)])
               for u in layers]
    starved = [(u, experts) for u, experts in starved if experts]
    if not starved:
        return None
    even = _even_share(u for u, _ in starved)
    total = sum(len(experts) for _, experts in starved)
    if total == 1:
        u, (expert,) = starved[0]
        return (f"layer {u.layer} expert {expert} took {_pct(u.shares[expert])} of assignments (even share "
                f"{even}): the router starves it, so it barely trains. {_ROUTER_ADVICE}")
    groups = [f"layer {u.layer} expert{'s' if len(experts) > 1 else ''} "
              + ", ".join(f"{e} ({_pct(u.shares[e])})" for e in experts) for u, experts in starved]
    listed = "; ".join(groups[:MAX_LISTED_LAYERS])
    if len(groups) > MAX_LISTED_LAYERS:
        listed += f"; and {len(groups) - MAX_LISTED_LAYERS} more layers"
    return (f"{total} experts took under a quarter of the even share ({even}) of assignments: {listed}. "
            f"The router starves them, so they barely train. {_ROUTER_ADVICE}")


def _imbalance_warning(layers: list[LayerUsage]) -> str | None:
    hot = [u for u in layers if max(u.shares) > IMBALANCED_SHARE / len(u.shares)]
    if not hot:
        return None
    even = _even_share(hot)
    if len(hot) == 1:
        u = hot[0]
        head = f"layer {u.layer} expert {u.busiest} took {_pct(max(u.shares))} of assignments"
    else:
        head = (f"in {_layers_text([u.layer for u in hot])} the busiest expert took "
                f"{_pct_range([max(u.shares) for u in hot])} of assignments")
    return (f"{head}, more than twice the even share ({even}): a few experts do most of the work. "
            f"{_ROUTER_ADVICE}")


def _layers_text(layers: list[int]) -> str:
    """`layer 3`, or `layers 0-2, 5` (runs of consecutive layers collapsed)."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return "layers " + ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _even_share(layers: Iterable[LayerUsage]) -> str:
    sizes = {len(u.shares) for u in layers}
    return f"{100 / sizes.pop():.3g}%" if len(sizes) == 1 else "1/num_experts"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _pct_range(fractions: list[float]) -> str:
    low, high = _pct(min(fractions)), _pct(max(fractions))
    return low if low == high else f"{low[:-1]}-{high}"


def _finite(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None

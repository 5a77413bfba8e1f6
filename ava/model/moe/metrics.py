"""Per-layer expert statistics, returned by every MoE forward.

They stay tensors on the model's device: turning them into Python numbers
forces a host sync, so that happens only in `summarise_moe_stats`, which the
trainer calls on logging steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoEStats:
    """What one MoE layer did in one forward."""

    router_loss: torch.Tensor      # aux_coef * aux_loss + z_coef * z_loss; carries gradient
    aux_loss: torch.Tensor         # load-balancing loss, unweighted (detached)
    z_loss: torch.Tensor           # router z-loss, unweighted (detached)
    load: torch.Tensor             # (E,) assignments each expert was chosen for, before capacity
    dropped_fraction: torch.Tensor  # share of assignments dropped by the capacity limit
    entropy: torch.Tensor          # mean entropy (nats) of the router distribution per token
    kind: str = "moe"              # what was routed: "moe" (FFN experts), "moh" (heads), "moa" (attention experts)


def load_cv(load: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation of expert load: 0 when perfectly even, sqrt(E-1) when one expert takes all."""
    load = load.float()
    return load.std(unbiased=False) / load.mean().clamp_min(1e-9)


def summarise_moe_stats(stats: list[MoEStats]) -> dict[str, float]:
    """Flatten per-layer stats into named floats for logs (one host sync per kind of routing).

    Keys are `{kind}/layer{i}/{metric}` plus means over layers under `{kind}/{metric}`,
    kind being "moe" for expert FFNs, "moh" for routed heads, "moa" for attention experts.
    """
    out: dict[str, float] = {}
    for kind in dict.fromkeys(s.kind for s in stats):
        out.update(_summarise_kind([s for s in stats if s.kind == kind], kind))
    return out


def _summarise_kind(stats: list[MoEStats], kind: str) -> dict[str, float]:
    rows = []
    for s in stats:
        load = s.load.float()
        rows.append(torch.stack([s.aux_loss.float(), s.z_loss.float(), load_cv(load),
                                 s.dropped_fraction.float(), s.entropy.float(),
                                 load.max() / load.mean().clamp_min(1e-9)]))
    loads = torch.stack([s.load.float() for s in stats])
    values = torch.cat([torch.stack(rows).flatten(), loads.flatten()]).cpu().tolist()  # the one host transfer
    width = len(rows[0])
    table = [values[i * width:(i + 1) * width] for i in range(len(rows))]
    load_values = values[len(rows) * width:]
    names = ["aux_loss", "z_loss", "load_cv", "dropped_fraction", "router_entropy", "max_load_ratio"]
    out: dict[str, float] = {}
    for i, row in enumerate(table):
        for name, value in zip(names, row, strict=True):
            out[f"{kind}/layer{i}/{name}"] = value
    for j, name in enumerate(names):
        out[f"{kind}/{name}"] = sum(row[j] for row in table) / len(table)
    experts = loads.shape[1]
    unit = "head" if kind == "moh" else "expert"
    for i in range(len(stats)):
        for e in range(experts):
            out[f"{kind}/layer{i}/load/{unit}{e}"] = load_values[i * experts + e]
    return out

"""PNG plots of a run, drawn from its metrics.jsonl.

Reads the file rather than live records so the same function serves a
running job, a finished one and a killed one (whose last line may be cut
short). Uses matplotlib's object API on the Agg canvas: no pyplot, so no
global figure state and no display needed on a cluster node.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LAYER_PANELS = 12   # more layers than this: an evenly spaced selection, first and last included
MAX_EXPERT_LINES = 16   # more experts than this: a min-max band instead of one line each
_EXPERT_KEY = re.compile(r"^moe/layer(\d+)/load/expert(\d+)$")

Series = tuple[list[int], list[float]]


def read_metrics(metrics_path: Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping any line that is not a JSON object with an integer step.

    A run killed mid-write leaves a truncated last line; plotting must still work.
    """
    records = []
    try:
        lines = metrics_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


def write_plots(metrics_path: Path, plots_dir: Path, log_loss: bool = False) -> list[Path]:
    """Write loss.png, lr.png, throughput.png and (MoE runs) expert_load.png; returns the files written.

    A plot whose data is absent is skipped. `log_loss` draws the loss on a log axis.
    """
    records = read_metrics(metrics_path)
    figures = {
        "loss.png": _loss_figure(records, log_loss),
        "lr.png": _line_figure(records, "lr", "learning rate"),
        "throughput.png": _line_figure(records, "tokens_per_s", "tokens / s"),
        "expert_load.png": _expert_load_figure(records),
    }
    written = []
    for name, figure in figures.items():
        if figure is not None:
            plots_dir.mkdir(parents=True, exist_ok=True)
            written.append(_save(figure, plots_dir / name))
    return written


def _save(figure: Figure, path: Path) -> Path:
    """Write via a temporary file so a viewer never opens a half-written PNG while the run replots."""
    tmp = path.with_name(path.name + ".tmp")
    FigureCanvasAgg(figure).print_png(str(tmp))
    tmp.replace(path)
    return path


def series(records: Iterable[dict], key: str) -> Series:
    """(steps, values) of one numeric key, sorted by step; the last record wins a repeated step."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _loss_figure(records: list[dict], log_loss: bool) -> Figure | None:
    train, evals = series(records, "loss"), series(records, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    if train[0]:
        ax.plot(*train, label="train loss")
    if evals[0]:
        ax.plot(*evals, marker="o", linestyle="--", label="eval loss")
    if log_loss and all(v > 0 for v in train[1] + evals[1]):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def _line_figure(records: list[dict], key: str, label: str) -> Figure | None:
    steps, values = series(records, key)
    if not steps:
        return None
    figure = Figure(figsize=(7, 3.5), layout="constrained")
    ax = figure.subplots()
    ax.plot(steps, values)
    ax.set(xlabel="step", ylabel=label, title=label)
    ax.grid(alpha=0.3)
    return figure


def expert_loads(records: list[dict]) -> dict[int, dict[int, Series]]:
    """layer -> expert -> (steps, load fraction): the logged counts divided by the layer's total at that step."""
    loads: dict[int, dict[int, dict[int, float]]] = {}
    for record in records:
        counts: dict[int, dict[int, float]] = {}
        for key, value in record.items():
            match = _EXPERT_KEY.match(key) if key.startswith("moe/layer") else None
            if match and isinstance(value, int | float) and math.isfinite(value):
                counts.setdefault(int(match[1]), {})[int(match[2])] = float(value)
        for layer, experts in counts.items():
            total = sum(experts.values())
            if total <= 0:
                continue
            for expert, count in experts.items():
                loads.setdefault(layer, {}).setdefault(expert, {})[record["step"]] = count / total
    return {layer: {e: (sorted(s), [s[k] for k in sorted(s)]) for e, s in experts.items()}
            for layer, experts in loads.items()}


def _evenly_spaced(items: list[int], cap: int) -> list[int]:
    if len(items) <= cap:
        return items
    return sorted({items[round(i * (len(items) - 1) / (cap - 1))] for i in range(cap)})


def _expert_load_figure(records: list[dict]) -> Figure | None:
    loads = expert_loads(records)
    if not loads:
        return None
    layers = _evenly_spaced(sorted(loads), MAX_LAYER_PANELS)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    figure = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).flatten()
    for ax, layer in zip(axes, layers, strict=False):
        experts = loads[layer]
        n = len(experts)
        if n <= MAX_EXPERT_LINES:
            for expert in sorted(experts):
                ax.plot(*experts[expert], linewidth=1, label=f"expert {expert}")
        else:
            by_step: dict[int, list[float]] = {}
            for xs, ys in experts.values():
                for step, fraction in zip(xs, ys, strict=True):
                    by_step.setdefault(step, []).append(fraction)
            steps = sorted(by_step)
            low, high = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
            ax.fill_between(steps, low, high, alpha=0.3, label=f"min to max of {n} experts")
        ax.axhline(1 / n, color="black", linestyle="--", linewidth=1, label="even: 1/E")  # perfectly even routing
        ax.set_title(f"layer {layer}", fontsize="small")
        ax.set_xlabel("step", fontsize="small")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    # One legend for the figure: every panel has the same experts, and per-panel legends hide the lines.
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    shown = "" if len(layers) == len(loads) else f" ({len(layers)} of {len(loads)} layers)"
    figure.suptitle(f"expert load: share of each layer's token assignments{shown}")
    return figure

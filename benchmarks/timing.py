"""Timing and table printing shared by the benchmark scripts.

Several timed repeats after warm-up, summarised by a robust statistic (the
minimum or the median), never the mean, which one slow outlier drags.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                statistic: Callable[[list[float]], float] = min) -> dict[str, float]:
    """Time of each function, measured round-robin so that machine noise hits all of them alike.

    The default statistic is the minimum: on a shared machine noise only ever
    adds time, so the fastest repeat is the best estimate of the code's own cost
    (the reasoning of Python's timeit).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistic(s) for name, s in samples.items()}


def synchronised(step: Callable[[], None], device: Any) -> Callable[[], None]:
    """`step`, waiting for the GPU to finish it, so that wall time is the step's own time (CPU: `step` itself)."""
    if getattr(device, "type", device) != "cuda":
        return step
    import torch

    def timed() -> None:
        step()
        torch.cuda.synchronize(device)
    return timed


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results written to {path}")

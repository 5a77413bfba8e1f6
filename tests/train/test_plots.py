"""`write_plots`: the PNGs a run gets from its metrics.jsonl, and what it tolerates in that file."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ava.train.report.plots import MAX_EXPERT_LINES, expert_loads, read_metrics, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _moe_records(layers: int = 2, experts: int = 4, steps: int = 3) -> list[dict]:
    records = []
    for i in range(1, steps + 1):
        record = {"step": 10 * i, "loss": 3.0 / i, "lr": 1e-3 * i, "tokens_per_s": 5000.0 + i, "moe/load_cv": 0.1}
        for layer in range(layers):
            for e in range(experts):
                record[f"moe/layer{layer}/load/expert{e}"] = float(10 + e * i)
            record[f"moe/layer{layer}/dropped_fraction"] = 0.0
        records.append(record)
    records.append({"step": 10 * steps, "eval_loss": 1.2, "eval_perplexity": 3.3})
    return records


def _write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _assert_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width > 0 and image.height > 0
        return image.size


def test_a_moe_run_gets_loss_lr_throughput_and_expert_load_pngs(tmp_path):
    written = write_plots(_write(tmp_path / "metrics.jsonl", _moe_records()), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["expert_load.png", "loss.png", "lr.png", "throughput.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        _assert_png(path)
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_a_dense_run_gets_no_expert_load_plot(tmp_path):
    dense = [{k: v for k, v in r.items() if not k.startswith("moe/")} for r in _moe_records()]
    written = write_plots(_write(tmp_path / "metrics.jsonl", dense), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "throughput.png"]
    assert not (tmp_path / "plots" / "expert_load.png").exists()


def test_a_truncated_last_line_from_a_killed_run_is_ignored(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", _moe_records(), tail='{"step": 40, "loss": 0.7, "moe/lay')
    assert [r["step"] for r in read_metrics(metrics)] == [10, 20, 30, 30]
    written = write_plots(metrics, tmp_path / "plots")
    assert len(written) == 4
    for path in written:
        _assert_png(path)


def test_garbage_lines_and_a_missing_file_never_raise(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('not json\n[1, 2]\n{"no_step": 1}\n{"step": "x", "loss": 1}\n\x00\x01\n')
    assert read_metrics(metrics) == []
    assert write_plots(metrics, tmp_path / "plots") == []
    assert write_plots(tmp_path / "absent.jsonl", tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def test_expert_load_is_plotted_as_each_layers_fraction_of_its_assignments(tmp_path):
    loads = expert_loads(_moe_records(layers=2, experts=4))
    assert sorted(loads) == [0, 1] and sorted(loads[0]) == [0, 1, 2, 3]
    steps, fractions = loads[1][3]
    assert steps == [10, 20, 30]
    assert abs(fractions[0] - 13 / (10 + 11 + 12 + 13)) < 1e-9  # step 10: counts 10, 11, 12, 13
    for i in range(3):
        assert abs(sum(loads[0][e][1][i] for e in range(4)) - 1.0) < 1e-9


def test_many_layers_and_experts_still_make_one_readable_figure(tmp_path):
    records = _moe_records(layers=40, experts=MAX_EXPERT_LINES * 4)
    written = write_plots(_write(tmp_path / "metrics.jsonl", records), tmp_path / "plots")
    width, height = _assert_png(tmp_path / "plots" / "expert_load.png")
    assert tmp_path / "plots" / "expert_load.png" in written
    assert width <= 4 * 4 * 100 and height <= 3 * 3 * 100  # at most a 4 x 3 grid of panels at 100 dpi


def test_log_loss_still_writes_a_loss_plot(tmp_path):
    written = write_plots(_write(tmp_path / "metrics.jsonl", _moe_records()), tmp_path / "plots", log_loss=True)
    _assert_png(next(p for p in written if p.name == "loss.png"))

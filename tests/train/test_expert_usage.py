"""`expert_usage` and `OverflowWatch`: MoE utilisation, capacity-overflow warnings and how they are merged."""

from __future__ import annotations

import json

import pytest

from ava.train.report.expert_usage import TABLE_HEADER, ExpertUsageReport, OverflowWatch, expert_usage


def _step(step: int, loads: dict[int, list[float]], dropped: dict[int, float] | None = None) -> dict:
    """A training record with the MoE keys the trainer logs: per-layer expert loads and dropped fractions."""
    dropped = dropped or {}
    record: dict = {"step": step, "loss": 3.0, "lr": 1e-4}
    for layer, counts in loads.items():
        for e, count in enumerate(counts):
            record[f"moe/layer{layer}/load/expert{e}"] = count
        record[f"moe/layer{layer}/dropped_fraction"] = dropped.get(layer, 0.0)
    record["moe/dropped_fraction"] = sum(dropped.values()) / max(len(loads), 1)
    return record


def _even(layers: int, experts: int = 4) -> dict[int, list[float]]:
    return {layer: [100.0] * experts for layer in range(layers)}


def _report(records: list[dict], capacity_factor: float | None = 1.25) -> ExpertUsageReport:
    report = expert_usage(records, capacity_factor)
    assert report is not None
    return report


def test_records_without_moe_keys_give_no_report() -> None:
    dense = [{"step": 10, "loss": 3.0, "lr": 1e-4}, {"step": 10, "eval_loss": 3.1}, {"step": 10, "event": "x"}]
    assert expert_usage(dense, None) is None
    assert expert_usage([], 1.25) is None


def test_shares_sum_the_counts_over_all_logged_steps() -> None:
    records = [_step(10, {0: [30.0, 10.0]}), _step(20, {0: [10.0, 50.0]}), {"step": 20, "eval_loss": 3.0}]
    report = _report(records)
    # 40 and 60 of 100 assignments; a mean of per-step fractions would give 0.458 / 0.542.
    assert report.layers[0].shares == pytest.approx([0.4, 0.6])
    assert report.steps == 2
    assert report.table_rows() == [("0", "40.0%", "60.0%", "1", "0.0%")]
    assert len(TABLE_HEADER) == len(report.table_rows()[0])


def test_non_finite_counts_are_skipped_and_a_repeated_step_counts_once() -> None:
    records = [_step(10, {0: [30.0, 10.0]}), _step(20, {0: [float("nan"), 20.0]}),
               _step(10, {0: [10.0, 10.0]})]  # step 10 logged again after a resume: the last record wins
    report = _report(records)
    assert report.layers[0].shares == pytest.approx([10.0 / 40.0, 30.0 / 40.0])
    assert report.steps == 2


def test_capacity_overflow_warns_with_layer_numbers_and_fix() -> None:
    records = [_step(10, _even(4), {3: 0.040}), _step(20, _even(4), {3: 0.044})]
    report = _report(records, capacity_factor=1.25)
    assert report.layers[3].dropped_fraction == pytest.approx(0.042)
    assert report.warnings == [
        "layer 3 dropped 4.2% of token assignments at model.expert_capacity_factor 1.25: those tokens skip "
        "the FFN. Raise model.expert_capacity_factor (e.g. 2.0) or set it to 0 (dropless), or balance the "
        "router with a higher model.router_aux_loss_coef."]


def test_overflow_below_the_threshold_does_not_warn() -> None:
    assert _report([_step(10, _even(2), {1: 0.009})]).warnings == []


@pytest.mark.parametrize("capacity_factor", [None, 0.0])
def test_dropless_layers_never_warn_about_overflow(capacity_factor: float | None) -> None:
    records = [_step(10, _even(4), {3: 0.2})]
    assert _report(records, capacity_factor).warnings == []


def test_overflow_in_many_layers_is_one_line_listing_them() -> None:
    dropped = {0: 0.021, 3: 0.030, 5: 0.040}
    report = _report([_step(10, _even(24), dropped)], capacity_factor=2.0)
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("layers 0, 3, 5 dropped 2.1-4.0% of token assignments at "
                                         "model.expert_capacity_factor 2: ")
    assert "(e.g. 4.0)" in report.warnings[0]


def test_consecutive_layers_are_collapsed_into_a_range() -> None:
    dropped = {layer: 0.05 for layer in (0, 1, 2, 3, 4, 5, 8)}
    report = _report([_step(10, _even(24), dropped)])
    assert report.warnings[0].startswith("layers 0-5, 8 dropped 5.0% of token assignments")


def test_under_used_expert_is_named_with_its_share() -> None:
    report = _report([_step(10, {0: [330.0, 330.0, 329.0, 11.0]})])
    assert report.warnings == [
        "layer 0 expert 3 took 1.1% of assignments (even share 25%): the router starves it, so it barely "
        "trains. Raise model.router_aux_loss_coef or use model.router_type aux_loss_free."]


def test_under_used_experts_of_many_layers_are_one_line() -> None:
    loads = _even(24)
    loads[2] = [330.0, 330.0, 330.0, 10.0]
    loads[7] = [480.0, 480.0, 20.0, 20.0]
    report = _report([_step(10, loads)])
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("3 experts took under a quarter of the even share (25%) of assignments: "
                                         "layer 2 expert 3 (1.0%); layer 7 experts 2 (2.0%), 3 (2.0%). ")


def test_busiest_expert_above_twice_the_even_share_is_an_imbalance() -> None:
    counts = [300.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0]  # 30% against an even 12.5%
    report = _report([_step(10, {0: [100.0] * 8, 1: counts})])
    assert report.warnings == [
        "layer 1 expert 0 took 30.0% of assignments, more than twice the even share (12.5%): a few experts do "
        "most of the work. Raise model.router_aux_loss_coef or use model.router_type aux_loss_free."]
    assert report.table_rows()[1] == ("1", "10.0%", "30.0%", "0", "0.0%")


def test_imbalance_in_many_layers_is_one_line() -> None:
    hot = [300.0] + [100.0] * 7
    report = _report([_step(10, {0: hot, 1: [100.0] * 8, 2: [400.0] + [100.0] * 7})])
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("in layers 0, 2 the busiest expert took 30.0-36.4% of assignments")


def test_two_experts_both_always_chosen_give_no_warning() -> None:
    # top-2 of 2 experts: every token goes to both, 50% each; nothing is unbalanced.
    assert _report([_step(10, {0: [64.0, 64.0], 1: [64.0, 64.0]})]).warnings == []


def test_report_serialises_to_json() -> None:
    data = json.loads(json.dumps(_report([_step(10, {0: [30.0, 10.0]}, {0: 0.5})]).as_dict()))
    assert data["steps"] == 1
    assert data["layers"] == [{"layer": 0, "shares": [0.75, 0.25], "dropped_fraction": 0.5}]
    assert len(data["warnings"]) == 1


def test_overflow_watch_warns_once_then_again_only_when_the_share_doubles() -> None:
    watch = OverflowWatch(capacity_factor=1.25)
    fired = [watch.check(_step(step, _even(4), {2: dropped}))
             for step, dropped in ((10, 0.005), (20, 0.02), (30, 0.03), (40, 0.039), (50, 0.04), (60, 0.05))]
    assert [message is not None for message in fired] == [False, True, False, False, True, False]
    assert fired[1] is not None and fired[1].startswith(
        "step 20: layer 2 dropped 2.0% of token assignments at model.expert_capacity_factor 1.25")
    assert fired[4] is not None and "4.0%" in fired[4]


def test_overflow_watch_names_every_layer_over_the_threshold() -> None:
    message = OverflowWatch(2.0).check(_step(10, _even(4), {0: 0.02, 1: 0.005, 3: 0.03}))
    assert message is not None and message.startswith("step 10: layers 0, 3 dropped 2.0-3.0% of token assignments")


def test_overflow_watch_falls_back_to_the_mean_over_layers() -> None:
    message = OverflowWatch(1.0).check({"step": 5, "moe/dropped_fraction": 0.03})
    assert message is not None and message.startswith("step 5: the MoE layers dropped 3.0% of token assignments")


@pytest.mark.parametrize("capacity_factor", [None, 0.0])
def test_overflow_watch_is_silent_for_dropless_layers(capacity_factor: float | None) -> None:
    watch = OverflowWatch(capacity_factor)
    assert watch.check(_step(10, _even(2), {0: 0.5})) is None


def test_overflow_watch_ignores_records_without_moe_keys() -> None:
    watch = OverflowWatch(1.25)
    assert watch.check({"step": 10, "loss": 3.0}) is None
    assert watch.check({"step": 10, "eval_loss": 3.0}) is None

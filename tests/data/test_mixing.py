"""Weighted mixing of sources: the probabilities, and that the seeded draw follows them."""

from __future__ import annotations

import itertools

import pytest

from ava.data.mixing import chosen_weights, mix, mixing_probabilities
from ava.errors import UserError


def test_temperature_one_keeps_the_proportions_and_a_high_one_tends_to_uniform() -> None:
    assert mixing_probabilities([600, 300, 100], 1.0) == pytest.approx([0.6, 0.3, 0.1])
    assert mixing_probabilities([600, 300, 100], 1e6) == pytest.approx([1 / 3] * 3, abs=1e-5)
    # T = 2: square roots, so the small source gains relative to T = 1.
    root = [600 ** 0.5, 300 ** 0.5, 100 ** 0.5]
    assert mixing_probabilities([600, 300, 100], 2.0) == pytest.approx([r / sum(root) for r in root])


def test_huge_sizes_do_not_overflow() -> None:
    assert mixing_probabilities([1e300, 1e300], 0.01) == pytest.approx([0.5, 0.5])


def test_non_positive_weights_are_refused() -> None:
    with pytest.raises(UserError, match="must all be positive"):
        mixing_probabilities([1.0, 0.0], 1.0)


def test_explicit_weights_replace_sizes_only_when_every_source_has_one() -> None:
    keys = ["data.sources[0]", "data.sources[1]"]
    assert chosen_weights([None, None], [10, 30], keys) == [10.0, 30.0]
    assert chosen_weights([2.0, 1.0], [10, 30], keys) == [2.0, 1.0]
    with pytest.raises(UserError, match=r"data.sources\[0\].weight set but data.sources\[1\] has none"):
        chosen_weights([2.0, None], [10, 30], keys)


def _tagged(tag: str, count: int, streaming: bool):
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": [f"{tag}{i}" for i in range(count)]})
    return dataset.to_iterable_dataset() if streaming else dataset


@pytest.mark.parametrize("streaming", [False, True])
def test_the_seeded_mix_draws_sources_with_the_probabilities(streaming: bool) -> None:
    probabilities = mixing_probabilities([6000, 3000, 1000], 1.0)
    mixed = mix([_tagged(t, n, streaming) for t, n in (("a", 6000), ("b", 3000), ("c", 1000))], probabilities, seed=7)
    draws = [row["text"][0] for row in itertools.islice(iter(mixed), 4000)]
    for tag, p in zip("abc", probabilities, strict=True):
        assert draws.count(tag) / len(draws) == pytest.approx(p, abs=0.03)
    again = mix([_tagged(t, n, streaming) for t, n in (("a", 6000), ("b", 3000), ("c", 1000))], probabilities, seed=7)
    assert [row["text"] for row in itertools.islice(iter(again), 200)] == \
        [row["text"] for row in itertools.islice(iter(mixed), 200)]


def test_every_source_is_read_to_its_end_so_a_small_upsampled_one_repeats() -> None:
    mixed = mix([_tagged("a", 90, False), _tagged("b", 10, False)], [0.5, 0.5], seed=0)
    texts = [row["text"] for row in mixed]
    assert {f"a{i}" for i in range(90)} <= set(texts)  # the large source is read to its end
    assert texts.count("b0") > 1  # the small one started again


def test_without_probabilities_sources_are_concatenated_in_order() -> None:
    mixed = mix([_tagged("a", 3, False), _tagged("b", 2, False)], None, seed=0)
    assert [row["text"] for row in mixed] == ["a0", "a1", "a2", "b0", "b1"]

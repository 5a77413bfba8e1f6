"""Built-in verifiable tasks: fixed-length prompts, exact scoring, corruptions that always score lower."""

from __future__ import annotations

import random

import pytest

from ava.errors import UserError
from ava.rlhf.tasks import (
    DELIMITER,
    TASKS,
    TaskExample,
    make_task,
    preference_pairs,
    sft_examples,
)

ALL = sorted(TASKS)
LENGTHS = [1, 2, 6, 9]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("length", LENGTHS)
def test_every_answer_scores_exactly_one(name: str, length: int) -> None:
    task = make_task(name, length)
    for ex in sft_examples(task, 50, seed=0):
        assert len(ex.answer) == length
        assert task.score(ex.prompt, ex.answer, ex.answer) == 1.0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("length", LENGTHS)
def test_prompts_of_one_config_share_length_and_end_with_delimiter(name: str, length: int) -> None:
    prompts = [ex.prompt for ex in sft_examples(make_task(name, length), 100, seed=3)]
    assert len({len(p) for p in prompts}) == 1
    assert all(p.endswith(DELIMITER) and p.count(DELIMITER) == 1 for p in prompts)
    assert all(p.isascii() for p in prompts)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("length", LENGTHS)
def test_corruption_keeps_length_and_scores_strictly_lower(name: str, length: int) -> None:
    task = make_task(name, length)
    rng = random.Random(7)
    for _ in range(200):
        ex = task.sample(rng)
        bad = task.corrupt(ex, rng)
        assert len(bad) == len(ex.answer)
        assert task.score(ex.prompt, ex.answer, bad) < 1.0


def test_sort_corruption_exists_when_all_digits_are_equal() -> None:
    task = make_task("sort", 4)
    ex = TaskExample("s:7777=", "7777")
    bad = task.corrupt(ex, random.Random(0))
    assert len(bad) == 4 and bad != "7777"


def test_sort_corruption_swaps_neighbours_out_of_order() -> None:
    task = make_task("sort", 6)
    bad = task.corrupt(TaskExample("s:312455=", "123455"), random.Random(0))
    assert sorted(bad) == sorted("123455") and bad != "123455"


@pytest.mark.parametrize("name", ALL)
def test_sampling_is_deterministic_per_seed_and_differs_across_seeds(name: str) -> None:
    task = make_task(name, 6)
    assert sft_examples(task, 20, seed=1) == sft_examples(task, 20, seed=1)
    assert sft_examples(task, 20, seed=1) != sft_examples(task, 20, seed=2)
    assert preference_pairs(task, 20, seed=1) == preference_pairs(task, 20, seed=1)


@pytest.mark.parametrize("name", ALL)
def test_preference_pairs_chosen_is_the_answer_and_rejected_differs(name: str) -> None:
    task = make_task(name, 5)
    pairs = preference_pairs(task, 50, seed=4)
    assert len(pairs) == 50
    for prompt, chosen, rejected in pairs:
        assert chosen != rejected and len(chosen) == len(rejected)
        assert task.score(prompt, chosen, chosen) == 1.0 > task.score(prompt, chosen, rejected)


def test_digits_prompt_continues_an_arithmetic_progression_mod_10() -> None:
    ex = make_task("digits", 4).sample(random.Random(0))
    digits = ex.prompt[2:-1] + ex.answer
    assert ex.prompt.startswith("d:") and len(digits) == 8
    steps = {(int(b) - int(a)) % 10 for a, b in zip(digits, digits[1:], strict=False)}
    assert len(steps) == 1 and steps != {0}


def test_digits_score_is_common_prefix_over_longer_length() -> None:
    task = make_task("digits", 4)
    p = "d:1357="
    assert task.score(p, "9135", "9135") == 1.0
    assert task.score(p, "9135", "9105") == 0.5  # matches after the first error do not count
    assert task.score(p, "9135", "0135") == 0.0
    assert task.score(p, "9135", "91") == 0.5  # missing characters cost
    assert task.score(p, "9135", "913500") == pytest.approx(4 / 6)  # extra characters after a right answer cost
    assert task.score(p, "9135", "") == 0.0


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_position_accuracy_counts_matching_positions_over_longer_length(name: str) -> None:
    task = make_task(name, 4)
    assert task.score("x", "1234", "1034") == 0.75  # one wrong position
    assert task.score("x", "1234", "4321") == 0.0
    assert task.score("x", "1234", "12") == 0.5  # missing characters cost
    assert task.score("x", "1234", "123456") == pytest.approx(4 / 6)  # extra characters cost
    assert task.score("x", "1234", "") == 0.0


def test_transform_tasks_answer_copy_reverse_and_sort() -> None:
    rng_seed = 5
    copy, rev, srt = (sft_examples(make_task(n, 6), 1, rng_seed)[0] for n in ("copy", "reverse", "sort"))
    digits = copy.prompt[2:-1]
    assert (copy.prompt[:2], rev.prompt[:2], srt.prompt[:2]) == ("c:", "r:", "s:")
    assert copy.answer == digits
    assert rev.answer == rev.prompt[2:-1][::-1]
    assert srt.answer == "".join(sorted(srt.prompt[2:-1]))


def test_target_token_repeats_the_named_character() -> None:
    task = make_task("target_token", 5)
    for ex in sft_examples(task, 30, seed=0):
        assert len(ex.prompt) == 4 and ex.prompt.startswith("t:")
        assert ex.answer == ex.prompt[2] * 5
    assert task.score("t:7=", "77777", "77a77") == 0.8
    assert task.score("t:7=", "77777", "777") == 0.6
    assert task.score("t:7=", "77777", "7777777") == pytest.approx(5 / 7)


def test_unknown_task_name_suggests_the_closest() -> None:
    with pytest.raises(UserError) as err:
        make_task("revrse")
    text = str(err.value)
    assert "'revrse'" in text and "did you mean 'reverse'" in text
    assert all(name in text for name in TASKS)


def test_unknown_task_name_without_close_match_lists_tasks() -> None:
    with pytest.raises(UserError, match="use one of 'digits'"):
        make_task("zzzzzz")


@pytest.mark.parametrize("length", [0, -1, 2.5, True])
def test_bad_length_is_a_user_error(length: object) -> None:
    with pytest.raises(UserError, match="length"):
        make_task("copy", length)  # type: ignore[arg-type]

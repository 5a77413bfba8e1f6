"""Rewards as code: loading `module:function` specs, task rewards, and validation of what a reward returns."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ava.errors import UserError
from ava.rlhf.rewards import load_reward_function, score_responses, task_reward
from ava.rlhf.tasks import make_task, sft_examples

_counter = itertools.count()


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Writes a uniquely named module into the working directory and forgets it from sys.modules afterwards."""
    monkeypatch.chdir(tmp_path)
    names: list[str] = []

    def write(source: str) -> str:
        name = f"ava_test_reward_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def _load_error(spec: str) -> str:
    with pytest.raises(UserError) as err:
        load_reward_function(spec)
    text = str(err.value)
    assert spec in text and "rlhf.reward_function" in text and "Fix:" in text
    return text


def test_loads_a_function_from_the_working_directory_and_restores_sys_path(user_module) -> None:
    name = user_module("""
        def exact(prompts, responses, **info):
            return [float(r == a) for r, a in zip(responses, info["answers"])]
    """)
    before = list(sys.path)
    fn = load_reward_function(f"{name}:exact")
    assert sys.path == before
    assert fn(["p", "q"], ["a", "x"], answers=["a", "b"]) == [1.0, 0.0]


def test_loads_a_function_from_a_package_in_the_working_directory(user_module, tmp_path: Path) -> None:
    (tmp_path / "ava_test_pkg").mkdir()
    (tmp_path / "ava_test_pkg" / "__init__.py").write_text("")
    (tmp_path / "ava_test_pkg" / "scoring.py").write_text("def length(prompts, responses, **info):\n"
                                                          "    return [len(r) for r in responses]\n")
    try:
        assert load_reward_function("ava_test_pkg.scoring:length")(["p"], ["abc"]) == [3]
    finally:
        sys.modules.pop("ava_test_pkg.scoring", None)
        sys.modules.pop("ava_test_pkg", None)


@pytest.mark.parametrize("spec", ["no_colon", "a:b:c", "mod:", ":fn", "1mod:fn", "mod:fn-x", "mod..x:fn"])
def test_malformed_spec_says_the_expected_form(spec: str) -> None:
    assert "module:function" in _load_error(spec)


def test_missing_module_is_named_with_a_fix(user_module) -> None:
    text = _load_error("ava_no_such_module_xyz:reward")
    assert "module 'ava_no_such_module_xyz' not found" in text and "working directory" in text


def test_import_error_inside_module_reports_its_text(user_module) -> None:
    name = user_module("raise RuntimeError('bad config in rewards')\n")
    text = _load_error(f"{name}:reward")
    assert "importing" in text and "RuntimeError: bad config in rewards" in text


def test_missing_dependency_of_the_module_is_not_reported_as_the_module_missing(user_module) -> None:
    name = user_module("import ava_absent_dependency_xyz\n")
    text = _load_error(f"{name}:reward")
    assert "ava_absent_dependency_xyz" in text and "not found (searched" not in text


def test_syntax_error_in_module_is_a_user_error(user_module) -> None:
    name = user_module("def broken(:\n")
    assert "SyntaxError" in _load_error(f"{name}:broken")


def test_missing_attribute_suggests_a_close_callable(user_module) -> None:
    name = user_module("""
        def exact_match(prompts, responses, **info):
            return [0.0] * len(prompts)
        def _private(): pass
    """)
    text = _load_error(f"{name}:exact_mach")
    assert "no attribute 'exact_mach'" in text and f"did you mean '{name}:exact_match'" in text


def test_missing_attribute_without_close_match_lists_callables(user_module) -> None:
    name = user_module("def alpha(p, r, **i): return []\ndef beta(p, r, **i): return []\n")
    assert "alpha, beta" in _load_error(f"{name}:zzzzzz")


def test_non_callable_attribute_is_rejected(user_module) -> None:
    name = user_module("reward = 3\n")
    assert "'reward' is a int, not a function" in _load_error(f"{name}:reward")


def test_task_reward_scores_against_the_answers() -> None:
    task = make_task("copy", 4)
    fn = task_reward(task)
    assert fn(["c:1234=", "c:5678="], ["1234", "5600"], answers=["1234", "5678"]) == [1.0, 0.5]
    examples = sft_examples(task, 5, seed=0)
    prompts, answers = [e.prompt for e in examples], [e.answer for e in examples]
    assert score_responses(fn, prompts, answers, answers, "copy") == [1.0] * 5


def test_task_reward_without_an_answer_is_an_error() -> None:
    fn = task_reward(make_task("copy", 4))
    with pytest.raises(UserError, match=r"no answer for prompt 1 \('c:5678='\)"):
        score_responses(fn, ["c:1234=", "c:5678="], ["1234", "5678"], ["1234", None], "copy")
    with pytest.raises(UserError, match="one answer per prompt"):
        fn(["c:1234="], ["1234"])


def _constant(value: object):
    return lambda prompts, responses, **info: value


@pytest.mark.parametrize("value", [[0.5, 1], (0, 1.0), np.array([0.5, 1.0]), np.array([True, False]),
                                   [np.float32(0.25), np.int64(2)]])
def test_accepts_lists_tuples_and_1d_arrays_of_numbers(value: object) -> None:
    scores = score_responses(_constant(value), ["a", "b"], ["x", "y"], [None, None], "ok")
    assert len(scores) == 2 and all(type(s) is float for s in scores)


def test_accepts_a_1d_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    fn = _constant(torch.tensor([0.5, 2.0], requires_grad=True))
    assert score_responses(fn, ["a", "b"], ["x", "y"], [None, None], "t") == [0.5, 2.0]


@pytest.mark.parametrize(("value", "said"), [
    (None, "returned a NoneType"),
    ("0.5", "returned a str"),
    (0.5, "returned a float"),
    ({"a": 1.0}, "returned a dict"),
    (np.zeros((2, 1)), "of shape (2, 1)"),
    ([1.0], "returned 1 values for 2 responses"),
    ([1.0, 2.0, 3.0], "returned 3 values for 2 responses"),
    ([1.0, float("nan")], "returned nan at index 1"),
    ([float("inf"), 1.0], "returned inf at index 0"),
    ([1.0, "1.0"], "returned '1.0' (str) at index 1, not a number"),
    ([None, 1.0], "returned None (NoneType) at index 0"),
    ([1.0, [2.0]], "returned [2.0] (list) at index 1"),
])
def test_rejects_bad_return_values_naming_the_function(value: object, said: str) -> None:
    with pytest.raises(UserError) as err:
        score_responses(_constant(value), ["a", "b"], ["x", "y"], [None, None], "my_mod:reward")
    text = str(err.value)
    assert "'my_mod:reward'" in text and said in text
    assert "Fix: make my_mod:reward return a list of 2 finite numbers" in text


def test_exception_in_user_function_is_wrapped_with_its_text_and_cause() -> None:
    def reward(prompts, responses, **info):
        raise KeyError("score_table")

    with pytest.raises(UserError) as err:
        score_responses(reward, ["a"], ["x"], [None], "my_mod:reward")
    assert "'my_mod:reward' raised KeyError: 'score_table'" in str(err.value) and "Fix:" in str(err.value)
    assert isinstance(err.value.__cause__, KeyError)


def test_reward_receives_answers_as_keyword() -> None:
    seen: dict = {}

    def reward(prompts, responses, **info):
        seen.update(info, prompts=prompts, responses=responses)
        return [1.0]

    score_responses(reward, ["p"], ["r"], ["a"], "spy")
    assert seen == {"answers": ["a"], "prompts": ["p"], "responses": ["r"]}

"""Rewards as code: load a user's `module:function`, score a built-in task, and check what a reward returns.

A reward function has the TRL signature `fn(prompts, responses, **info) -> list[float]`;
`info["answers"]` holds each prompt's reference answer (or None). Every call goes
through `score_responses`, so a reward that returns the wrong thing fails at the
step it happens, with its name, instead of as a shape error deep in the loss.
"""

from __future__ import annotations

import difflib
import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from ava.errors import UserError
from ava.rlhf.tasks import Task

RewardFunction = Callable[..., list[float]]

SETTING = "rlhf.reward_function"
_SPEC_FORM = "write it as `package.module:function`, e.g. `my_rewards:exact_match`"


def _spec_error(spec: str, problem: str, fix: str) -> UserError:
    return UserError(f"{SETTING} {spec!r}: {problem}", fix)


def _split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise _spec_error(str(spec), "is not of the form `module:function`", _SPEC_FORM)
    module_name, function_name = spec.split(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not function_name.isidentifier():
        raise _spec_error(spec, "is not of the form `module:function` (dotted Python names)", _SPEC_FORM)
    return module_name, function_name


def _import(module_name: str, spec: str) -> ModuleType:
    """Import with the working directory first on sys.path, as `python -m` would, and leave sys.path as it was."""
    saved = list(sys.path)
    sys.path.insert(0, os.getcwd())
    importlib.invalidate_caches()  # a module written after the finders listed the directory is otherwise missed
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only the spec's own module (or a parent package) being absent is "not found"; a missing
        # dependency imported by the user's module is an import failure, reported with its text below.
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise _spec_error(spec, f"module '{module_name}' not found (searched the working directory "
                              f"{os.getcwd()} and the installed packages)",
                              f"run from the directory holding {module_name.replace('.', '/')}.py, "
                              "install its package, or correct the module name") from err
        raise _spec_error(spec, f"importing '{module_name}' failed: {type(err).__name__}: {err}",
                          "fix the error in that module (or install what it imports)") from err
    except Exception as err:
        raise _spec_error(spec, f"importing '{module_name}' failed: {type(err).__name__}: {err}",
                          "fix the error in that module; `python -c 'import "
                          f"{module_name}'` shows the full traceback") from err
    finally:
        sys.path[:] = saved


def load_reward_function(spec: str) -> RewardFunction:
    """The callable named by `spec` ("package.module:function"), imported from the working directory or installed packages."""
    module_name, function_name = _split_spec(spec)
    module = _import(module_name, spec)
    if not hasattr(module, function_name):
        callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        close = difflib.get_close_matches(function_name, callables, n=1, cutoff=0.5)
        if close:
            fix = f"did you mean '{module_name}:{close[0]}'?"
        elif callables:
            fix = f"use one of the module's callables: {', '.join(callables)}"
        else:
            fix = f"define `def {function_name}(prompts, responses, **info) -> list[float]` in {module_name}"
        raise _spec_error(spec, f"module '{module_name}' has no attribute '{function_name}'", fix)
    function = getattr(module, function_name)
    if not callable(function):
        raise _spec_error(spec, f"'{function_name}' is a {type(function).__name__}, not a function",
                          f"point {SETTING} at a function `{function_name}(prompts, responses, **info) -> list[float]`")
    return function


def task_reward(task: Task) -> RewardFunction:
    """A reward function scoring each response with `task.score` against `info["answers"]`."""

    def reward(prompts: Sequence[str], responses: Sequence[str], **info: object) -> list[float]:
        answers = info.get("answers")
        if not isinstance(answers, Sequence) or len(answers) != len(prompts):
            raise UserError(f"the '{task.name}' task reward needs one answer per prompt; got answers={answers!r}",
                            "pass answers=[...] with the reference answer of each prompt")
        scores = []
        for i, (prompt, answer, response) in enumerate(zip(prompts, answers, responses, strict=False)):
            if answer is None:
                raise UserError(f"the '{task.name}' task reward has no answer for prompt {i} ({prompt!r})",
                                "use prompts made by the task (they carry answers), or set "
                                f"{SETTING} to a reward that needs no reference answer")
            scores.append(task.score(prompt, str(answer), response))
        return scores

    reward.__name__ = reward.__qualname__ = f"task_reward[{task.name}]"
    return reward


def _as_list(result: object) -> list[object] | None:
    """The values of a list, tuple, or 1-D tensor/ndarray; None for anything else.

    torch and numpy are looked up in sys.modules instead of imported: a function
    cannot return a tensor unless its module is already loaded.
    """
    if isinstance(result, (list, tuple)):
        return list(result)
    for module_name, type_name in (("torch", "Tensor"), ("numpy", "ndarray")):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(result, getattr(module, type_name)):
            array: Any = result.detach().cpu() if module_name == "torch" else result
            return list(array.tolist()) if array.ndim == 1 else None
    return None


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def score_responses(fn: RewardFunction, prompts: Sequence[str], responses: Sequence[str],
                    answers: Sequence[str | None], name: str) -> list[float]:
    """Call reward `fn` (named `name` in errors) and return one finite float per response, or explain what is wrong."""
    if not len(prompts) == len(responses) == len(answers):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(answers)} answers do not line up")
    try:
        result = fn(list(prompts), list(responses), answers=list(answers))
    except UserError:
        raise  # already says what to fix (e.g. a built-in task reward missing an answer)
    except Exception as err:
        raise UserError(f"reward function {name!r} raised {type(err).__name__}: {err}",
                        f"fix {name} so it returns one number per response for these inputs "
                        f"(first prompt {_shown(prompts[0] if prompts else None)})") from err
    expected = f"return a list of {len(prompts)} finite numbers, one per response"
    values = _as_list(result)
    if values is None:
        shape = getattr(result, "shape", None)
        got = f"a {type(result).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")
        raise UserError(f"reward function {name!r} returned {got}: {_shown(result)}", f"make {name} {expected}")
    if len(values) != len(prompts):
        raise UserError(f"reward function {name!r} returned {len(values)} values for {len(prompts)} responses",
                        f"make {name} {expected}")
    scores = []
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real):
            raise UserError(f"reward function {name!r} returned {_shown(value)} ({type(value).__name__}) "
                            f"at index {i}, not a number", f"make {name} {expected}")
        if not math.isfinite(float(value)):
            raise UserError(f"reward function {name!r} returned {value} at index {i}",
                            f"make {name} {expected}: guard divisions and logs against NaN and inf")
        scores.append(float(value))
    return scores


class Scorer:
    """A reward function bound to its name: scores responses to prompts that may carry reference answers."""

    def __init__(self, fn: RewardFunction, name: str, needs_answers: bool = False) -> None:
        self.fn, self.name = fn, name
        self.needs_answers = needs_answers  # a task's scorer compares with each prompt's reference answer

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None]) -> list[float]:
        return score_responses(self.fn, prompts, responses, answers, self.name)


def make_scorer(spec: str | None, task: Task | None) -> Scorer | None:
    """`rlhf.reward_function` when set, else the task's own scorer; None when there is neither."""
    if spec is not None:
        return Scorer(load_reward_function(spec), spec)
    if task is not None:
        return Scorer(task_reward(task), f"the {task.name} task's scorer", needs_answers=True)
    return None

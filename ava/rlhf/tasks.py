"""Built-in verifiable tasks: prompts, demonstrations, preference pairs and rewards with no download.

Each task makes short ASCII prompts whose correct response a program can check,
so SFT, the reward model, DPO, PPO and GRPO can be trained and judged on CPU in
minutes. All prompts of one task config have the same length (rollouts batch
without padding) and end with `DELIMITER`, so the response starts unambiguously.
"""

from __future__ import annotations

import difflib
import random
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ava.errors import UserError

DELIMITER = "="
DIGITS = string.digits


@dataclass(frozen=True)
class TaskExample:
    """One prompt and its correct response (decoded text, without the eos)."""

    prompt: str
    answer: str


def position_accuracy(answer: str, response: str) -> float:
    """Positions where `response` matches `answer`, over the longer length, so missing or extra characters cost."""
    if response == answer:
        return 1.0
    hits = sum(r == a for r, a in zip(response, answer, strict=False))
    return hits / max(len(answer), len(response))


def prefix_match(answer: str, response: str) -> float:
    """Length of the common prefix over the longer length: one wrong step spoils everything after it."""
    if response == answer:
        return 1.0
    common = 0
    for r, a in zip(response, answer, strict=False):
        if r != a:
            break
        common += 1
    return common / max(len(answer), len(response))


class Task(ABC):
    """A verifiable task: samples examples, scores responses, and makes worse responses for preference pairs."""

    name: ClassVar[str]
    tag: ClassVar[str]  # starts each prompt, so a mixed dataset shows which task a prompt came from
    alphabet: ClassVar[str] = DIGITS  # characters a corruption may substitute

    def __init__(self, length: int = 6) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise UserError(f"RLHF task '{self.name}': answer length {length!r} is not a positive whole number",
                            "give the task length as an integer >= 1, e.g. 6")
        self.length = length

    @abstractmethod
    def sample(self, rng: random.Random) -> TaskExample:
        """A new example drawn from `rng` only, so a seed fixes the whole dataset."""

    def score(self, prompt: str, answer: str, response: str) -> float:
        """A reward in [0, 1], 1.0 exactly when `response == answer`; position accuracy unless a task overrides it."""
        return position_accuracy(answer, response)

    def corrupt(self, example: TaskExample, rng: random.Random) -> str:
        """A plausible, same-length response that scores strictly below the answer: 1..length//3 characters changed."""
        chars = list(example.answer)
        count = rng.randint(1, max(1, len(chars) // 3))
        for i in rng.sample(range(len(chars)), count):
            chars[i] = rng.choice([c for c in self.alphabet if c != chars[i]])
        return "".join(chars)

    def _random_digits(self, rng: random.Random) -> str:
        return "".join(rng.choice(DIGITS) for _ in range(self.length))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"


class DigitsTask(Task):
    """Continue an arithmetic progression mod 10; scored by prefix match, since each digit follows from the last."""

    name = "digits"
    tag = "d:"

    def sample(self, rng: random.Random) -> TaskExample:
        start, step = rng.randint(0, 9), rng.randint(1, 9)
        seq = "".join(str((start + i * step) % 10) for i in range(2 * self.length))
        return TaskExample(self.tag + seq[: self.length] + DELIMITER, seq[self.length:])

    def score(self, prompt: str, answer: str, response: str) -> float:
        return prefix_match(answer, response)


class _DigitTransformTask(Task):
    """Prompt: tag + `length` random digits + delimiter; answer: a fixed transformation of the digits."""

    @abstractmethod
    def transform(self, digits: str) -> str:
        """The correct response for `digits`."""

    def sample(self, rng: random.Random) -> TaskExample:
        digits = self._random_digits(rng)
        return TaskExample(self.tag + digits + DELIMITER, self.transform(digits))


class CopyTask(_DigitTransformTask):
    """Repeat the digits: the easiest task, a first check that a policy learns at all."""

    name = "copy"
    tag = "c:"

    def transform(self, digits: str) -> str:
        return digits


class ReverseTask(_DigitTransformTask):
    """Reverse the digits: needs attention to the far end of the prompt."""

    name = "reverse"
    tag = "r:"

    def transform(self, digits: str) -> str:
        return digits[::-1]


class SortTask(_DigitTransformTask):
    """Sort the digits ascending."""

    name = "sort"
    tag = "s:"

    def transform(self, digits: str) -> str:
        return "".join(sorted(digits))

    def corrupt(self, example: TaskExample, rng: random.Random) -> str:
        """Swap two unequal neighbours, leaving the right digits out of order; change a digit when all are equal."""
        chars = list(example.answer)
        unequal = [i for i in range(len(chars) - 1) if chars[i] != chars[i + 1]]
        if not unequal:
            return super().corrupt(example, rng)
        i = rng.choice(unequal)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)


class TargetTokenTask(Task):
    """Repeat the named character `length` times: a dense per-token reward for checking RL plumbing.

    Prompts are always `t:<char>=`, so they share one length without padding. The
    score counts positions i < len(answer) holding the target, over the longer
    length; since the answer is the target repeated, this equals position accuracy.
    """

    name = "target_token"
    tag = "t:"
    alphabet = DIGITS + string.ascii_lowercase

    def sample(self, rng: random.Random) -> TaskExample:
        target = rng.choice(self.alphabet)
        return TaskExample(self.tag + target + DELIMITER, target * self.length)


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (DigitsTask, CopyTask, ReverseTask, SortTask, TargetTokenTask)
}


def make_task(name: str, length: int = 6) -> Task:
    """The built-in task `name` with answers of `length` characters."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1, cutoff=0.5)
        valid = ", ".join(f"'{n}'" for n in TASKS)
        fix = f"did you mean '{close[0]}'? The tasks are: {valid}" if close else f"use one of {valid}"
        raise UserError(f"unknown RLHF task {name!r}; the built-in tasks are {valid}", fix)
    return TASKS[name](length)


def _check_count(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"number of {what} {n!r} is not a whole number >= 0", f"ask for a count of {what} such as 64")


def sft_examples(task: Task, n: int, seed: int) -> list[TaskExample]:
    """`n` demonstrations (prompt, correct answer), the same list for the same seed."""
    _check_count(n, "SFT examples")
    rng = random.Random(seed)
    return [task.sample(rng) for _ in range(n)]


def preference_pairs(task: Task, n: int, seed: int) -> list[tuple[str, str, str]]:
    """`n` synthetic (prompt, chosen, rejected) triples: chosen is the answer, rejected a same-length corruption."""
    _check_count(n, "preference pairs")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        example = task.sample(rng)
        pairs.append((example.prompt, example.answer, task.corrupt(example, rng)))
    return pairs

"""User errors raised by the model: inputs it cannot take, weights it cannot load."""

from __future__ import annotations


class ModelInputError(ValueError):
    """An input the model cannot process, with the setting to change.

    Raised for user-fixable conditions (a sequence longer than the model's
    positions, a token id beyond the vocabulary, a checkpoint that does not
    match); the CLI prints the message and exits 2 instead of a traceback.
    """

    def __init__(self, message: str, fix: str) -> None:
        self.message, self.fix = message, fix
        super().__init__(f"{message}\n  Fix: {fix}")

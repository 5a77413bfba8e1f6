"""The user-error type every package raises: what is wrong, and the setting or action that fixes it.

It sits at the root of the package, below everything else, so that the data
pipeline, the launcher and the trainer can raise it without importing the
model (or each other). The CLI prints a `UserError` as one paragraph and
exits 2 without a traceback; anything else is a bug and keeps its traceback.
`ava.config.ConfigError` (every problem of a config stack at once) is one too.
"""

from __future__ import annotations


class UserError(ValueError):
    """A condition the user can fix, with the setting to change.

    Raised for user-fixable conditions (a sequence longer than the model's
    positions, a token id beyond the vocabulary, a checkpoint that does not
    match, an output directory that already holds a run); the CLI prints the
    message and exits 2 instead of a traceback.
    """

    # Whether every rank must say it (a problem a rank meets on its own disk or host), not only rank 0.
    every_rank = False

    def __init__(self, message: str, fix: str) -> None:
        self.message, self.fix = message, fix
        super().__init__(f"{message}\n  Fix: {fix}")

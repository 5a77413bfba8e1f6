"""Built-in corpora that need no download: the Python standard library, and a Markov chain.

The stdlib is real text for a smoke run on any machine.  The Markov chain has a
known entropy rate, so a model trained on it has a known floor for its loss: a
run whose loss does not approach `entropy_rate()` is not learning correctly.
"""

from __future__ import annotations

import os
import sysconfig
from bisect import bisect_right
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from ava.errors import UserError

# Directories of the stdlib that are not the library itself (third-party packages, its own test suite).
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def python_stdlib_documents(max_documents: int | None = None) -> list[str]:
    """The text of the running interpreter's stdlib `.py` files, one document each, in sorted path order.

    Sorted so that the corpus (and so a run) is the same on every call; unreadable
    or non-UTF-8 files are skipped rather than failing a smoke run.
    """
    return list(islice(stdlib_documents(), max_documents))


def stdlib_documents() -> Iterator[str]:
    """`python_stdlib_documents()` one at a time, read as they are asked for.

    A corpus of a fixed number of tokens needs only the first files, not the
    whole standard library (about 11 MB of text).
    """
    for path in _stdlib_paths(Path(sysconfig.get_paths()["stdlib"])):
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def _stdlib_paths(root: Path) -> list[Path]:
    """The stdlib's `.py` files outside `_SKIPPED_DIRS`, sorted as paths sort.

    Walked with the skipped directories pruned, not globbed and filtered:
    site-packages alone can hold ten times the stdlib's files.
    """
    paths: list[Path] = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _SKIPPED_DIRS]
        paths.extend(Path(directory, name) for name in files if name.endswith(".py"))
    return sorted(paths)


class MarkovCorpus:
    """A first-order Markov chain over `vocab_size` tokens with Dirichlet-drawn transition rows.

    Smaller `concentration` gives peakier rows, so a lower entropy rate.
    """

    def __init__(self, vocab_size: int, seed: int, concentration: float) -> None:
        if vocab_size < 2:
            raise UserError(f"Markov corpus vocab_size = {vocab_size} is too small", "set data.markov_vocab_size >= 2")
        if not concentration > 0:
            raise UserError(f"Markov corpus concentration = {concentration} must be positive", "use a value > 0")
        self.vocab_size = vocab_size
        rng = np.random.default_rng(seed)
        # float64 with a floor: a Dirichlet draw can underflow to an exact 0 at small concentrations,
        # which would make log-probabilities infinite; renormalise after the floor.
        matrix = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
        matrix = np.maximum(matrix, 1e-300)
        self.transition: np.ndarray = matrix / matrix.sum(axis=1, keepdims=True)

    def stationary(self) -> np.ndarray:
        """pi with pi P = pi, sum(pi) = 1, solved exactly as a linear system (not by simulation)."""
        n = self.vocab_size
        # (P^T - I) pi = 0 has rank n-1; replacing one equation with sum(pi) = 1 makes it uniquely solvable
        # (the chain is irreducible: every Dirichlet entry is positive).
        system = self.transition.T - np.eye(n)
        system[-1, :] = 1.0
        rhs = np.zeros(n)
        rhs[-1] = 1.0
        pi = np.linalg.solve(system, rhs)
        return np.asarray(pi / pi.sum())

    def entropy_rate(self) -> float:
        """sum_i pi_i H(P_i) in nats/token: the lowest loss any model can reach on long samples."""
        p = self.transition
        row_entropy = -(p * np.log(p)).sum(axis=1)
        return float(self.stationary() @ row_entropy)

    def sample(self, num_tokens: int, seed: int) -> np.ndarray:
        """`num_tokens` ids (int64), the first drawn from the stationary distribution so the sample is stationary."""
        if num_tokens < 0:
            raise UserError(f"Markov corpus num_tokens = {num_tokens} is negative", "ask for >= 0 tokens")
        rng = np.random.default_rng(seed)
        if num_tokens == 0:
            return np.empty(0, dtype=np.int64)
        cumulative = np.cumsum(self.transition, axis=1)
        cumulative[:, -1] = 1.0  # guard against rounding leaving the last bin short of 1
        uniforms = rng.random(num_tokens)
        state = min(int(np.searchsorted(np.cumsum(self.stationary()), uniforms[0], side="right")), self.vocab_size - 1)
        states = [state]
        # Each step depends on the previous token, so the chain itself is sequential. Python's bisect on a
        # row held as a list is ten times faster per token than np.searchsorted's call overhead, and gives
        # the same index (bisect_right is searchsorted side="right" on the same float64 values).
        rows: dict[int, list[float]] = {}
        draws = uniforms.tolist()
        for t in range(1, num_tokens):
            row = rows.get(state)
            if row is None:
                row = rows[state] = cumulative[state].tolist()
            state = bisect_right(row, draws[t])
            states.append(state)
        return np.array(states, dtype=np.int64)

"""The built-in corpora: the stdlib text and the Markov chain with a known entropy rate."""

from __future__ import annotations

import numpy as np
import pytest

from ava.data.builtin import MarkovCorpus, python_stdlib_documents
from ava.errors import UserError


def test_stdlib_documents_are_deterministic_python_source() -> None:
    first = python_stdlib_documents(max_documents=20)
    assert len(first) == 20
    assert first == python_stdlib_documents(max_documents=20)
    assert sum("def " in doc or "import " in doc for doc in first) >= 10
    assert python_stdlib_documents(max_documents=5) == first[:5]


def test_stdlib_documents_exclude_site_packages() -> None:
    documents = python_stdlib_documents(max_documents=None)
    assert len(documents) > 100
    # pytest is installed in this interpreter's site-packages; its source must not be in the corpus.
    assert not any("class Pytester" in doc for doc in documents)


def test_markov_stationary_distribution_is_invariant() -> None:
    corpus = MarkovCorpus(vocab_size=16, seed=1, concentration=0.5)
    pi = corpus.stationary()
    np.testing.assert_allclose(pi @ corpus.transition, pi, atol=1e-12)
    assert pi.sum() == pytest.approx(1.0) and (pi > 0).all()


def test_markov_entropy_rate_matches_empirical_nll() -> None:
    corpus = MarkovCorpus(vocab_size=32, seed=3, concentration=0.3)
    tokens = corpus.sample(200_000, seed=7)
    nll = -np.log(corpus.transition[tokens[:-1], tokens[1:]]).mean()
    assert nll == pytest.approx(corpus.entropy_rate(), abs=0.02)
    # The rate is well below log(V): a check that would not pass by accident with a uniform chain.
    assert corpus.entropy_rate() < 0.9 * np.log(32)


def test_markov_entropy_rate_weights_rows_by_the_stationary_distribution() -> None:
    corpus = MarkovCorpus(vocab_size=2, seed=0, concentration=1.0)
    corpus.transition = np.array([[0.9, 0.1], [0.5, 0.5]])
    # pi = (5/6, 1/6): state 0 is visited five times as often, so its low-entropy row dominates.
    np.testing.assert_allclose(corpus.stationary(), [5 / 6, 1 / 6])
    h0 = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert corpus.entropy_rate() == pytest.approx(5 / 6 * h0 + 1 / 6 * np.log(2))
    tokens = corpus.sample(100_000, seed=1)
    nll = -np.log(corpus.transition[tokens[:-1], tokens[1:]]).mean()
    assert nll == pytest.approx(corpus.entropy_rate(), abs=0.01)


def test_markov_entropy_rate_of_uniform_rows_is_log_vocab() -> None:
    corpus = MarkovCorpus(vocab_size=8, seed=0, concentration=1.0)
    corpus.transition = np.full((8, 8), 1 / 8)
    assert corpus.entropy_rate() == pytest.approx(np.log(8))


def test_markov_corpus_is_a_function_of_its_seeds() -> None:
    a = MarkovCorpus(vocab_size=10, seed=5, concentration=1.0)
    b = MarkovCorpus(vocab_size=10, seed=5, concentration=1.0)
    np.testing.assert_array_equal(a.transition, b.transition)
    np.testing.assert_array_equal(a.sample(1000, seed=2), b.sample(1000, seed=2))
    assert not np.array_equal(a.sample(1000, seed=2), a.sample(1000, seed=3))
    assert not np.array_equal(a.transition, MarkovCorpus(vocab_size=10, seed=6, concentration=1.0).transition)
    sample = a.sample(1000, seed=2)
    assert sample.min() >= 0 and sample.max() < 10


def test_markov_corpus_refuses_a_one_token_vocabulary() -> None:
    with pytest.raises(UserError, match="vocab_size = 1"):
        MarkovCorpus(vocab_size=1, seed=0, concentration=1.0)

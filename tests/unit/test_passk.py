"""pass@k against brute force over all k-subsets, and majority voting on crafted answers."""

from __future__ import annotations

import itertools
import math

import pytest

from opd.eval.passk import (
    majority_at_n,
    majority_vote,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_by_benchmark,
)
from opd.rewards.math import math_equal


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    exact = 1 - math.comb(990, 100) / math.comb(1000, 100)  # binomials far beyond float range
    assert pass_at_k(1000, 10, 100) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_means_overall_and_by_benchmark():
    assert mean_pass_at_k([(4, 0), (4, 4)], 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)
    rows = [("a", 4, 1), ("a", 4, 3), ("b", 2, 1)]
    out = pass_at_k_by_benchmark(rows, ks=[1, 2, 4])
    assert out["a"] == {
        1: pytest.approx(0.5),
        2: pytest.approx((0.5 + 1.0) / 2),
        4: pytest.approx(1.0),
    }
    assert out["b"] == {1: pytest.approx(0.5), 2: pytest.approx(1.0)}  # k=4 > n=2 left out


def test_majority_groups_by_normalisation_then_equivalence():
    answers = ["\\frac{1}{2}", "0.5", "1/2", "3", "3.0", None, ""]
    # strings alone: "3" and "3.0" normalise alike (2 votes); the three halves differ
    assert majority_vote(answers) == ("3", 2)
    # with math_equal the three halves form one group
    assert majority_vote(answers, equiv_fn=math_equal) == ("\\frac{1}{2}", 3)
    is_half = lambda a: math_equal(a, "1/2")
    assert majority_at_n(answers, is_half) == 0.0
    assert majority_at_n(answers, is_half, equiv_fn=math_equal) == 1.0


def test_majority_ties_abstentions_and_precomputed_flags():
    assert majority_vote(["7", "8", "8", "7"]) == ("7", 2)  # tie: first seen wins
    assert majority_vote([None, None]) == (None, 0)
    assert majority_at_n([None, None], lambda a: True) == 0.0
    # flags aligned with answers: the winning group's first sample decides
    assert majority_at_n(["1,000", "5", "1000"], [True, False, True]) == 1.0
    assert majority_at_n(["5", "4", "4"], [True, False, False]) == 0.0
    with pytest.raises(ValueError, match="flags"):
        majority_at_n(["5", "4"], [True])

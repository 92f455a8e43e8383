"""Contract: pass@k equals the brute-force average over all k-subsets; maj@k, bootstrap and the rating
estimate behave as their definitions say (eval/metrics.py, eval/rating.py)."""

import itertools
import math
import random

import pytest

from megatron_vp2o.eval import metrics as M
from megatron_vp2o.eval.rating import fit_rating, solve_probability


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_over_all_subsets():
    rng = random.Random(16)
    for _ in range(300):
        n = rng.randint(1, 12)
        correct = [rng.random() < rng.random() for _ in range(n)]
        for k in range(1, n + 1):
            assert M.pass_at_k(n, sum(correct), k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_k_edges_and_bad_arguments():
    assert M.pass_at_k(64, 0, 8) == 0.0 and M.pass_at_k(64, 64, 1) == 1.0
    assert M.pass_at_k(200, 1, 1) == pytest.approx(1 / 200)  # large n: exact integer binomials
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            M.pass_at_k(*bad)
    assert M.ks_for(1) == [1] and M.ks_for(8) == [1, 2, 4, 8] and M.ks_for(12) == [1, 2, 4, 8]


def test_problem_metrics_keys_avg_and_majority():
    correct = [False, True, True, False, True]
    votes = ["7", "3", "3", "9", "3"]  # wrong answers "7" and "9" once each, the right one "3" three times
    out = M.problem_metrics(correct, [0.5, 1, 1, 0, 1], votes)
    assert set(out) == {"pass@1", "pass@2", "pass@4", "avg@5", "maj@1", "maj@2", "maj@4"}
    assert out["pass@1"] == pytest.approx(3 / 5) and out["avg@5"] == pytest.approx(3.5 / 5)
    assert out["maj@1"] == 0.0  # first sample alone: "7", wrong
    assert out["maj@2"] == 0.0  # tie "7" vs "3": the vote seen first wins
    assert out["maj@4"] == 1.0  # "3" twice
    assert not M.majority([None, None], [True, True])  # no parsable answer: no vote


def test_bootstrap_delta_paired():
    base = [0.0, 0.5, 1.0, 0.25] * 5
    same = M.bootstrap_delta(base, base, lambda xs: sum(xs) / len(xs), n_boot=200)
    assert same == (0.0, 0.0, 0.0)
    shifted = [x + 0.1 for x in base]  # paired: every resample sees the same shift
    delta, lo, hi = M.bootstrap_delta(base, shifted, lambda xs: sum(xs) / len(xs), n_boot=200)
    assert delta == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    noisy = [x + random.Random(i).uniform(-0.3, 0.5) for i, x in enumerate(base)]
    delta, lo, hi = M.bootstrap_delta(base, noisy, lambda xs: sum(xs) / len(xs), n_boot=500)
    assert lo < delta < hi


def test_rating_recovers_the_generating_rating():
    ratings = [800, 1000, 1200, 1400, 1600, 1800, 2000, 2400]
    for true in (900.0, 1500.0, 2100.0):
        rates = [solve_probability(true, r) for r in ratings]
        fit = fit_rating(ratings, rates)
        assert fit["rating"] == pytest.approx(true, abs=1e-3) and fit["censored"] is None
        info = sum(p * (1 - p) for p in rates)
        assert fit["stderr"] == pytest.approx(400 / math.log(10) / math.sqrt(info), rel=1e-4)
    assert solve_probability(1500, 1500) == 0.5
    assert fit_rating([800, 1200], [1.0, 1.0])["censored"] == "above"
    assert fit_rating([800, 1200], [0.0, 0.0]) | {"stderr": 0} == {"rating": 0.0, "stderr": 0, "censored": "below",
                                                                   "problems": 2}
    more = fit_rating(ratings, [0.9] * 8)["rating"]
    assert more > fit_rating(ratings, [0.5] * 8)["rating"]  # solving more -> higher rating

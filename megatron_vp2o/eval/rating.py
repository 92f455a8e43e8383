"""A Codeforces-style rating from per-problem ratings and pass results (docs/evaluation.md).

Model: Elo's logistic expected score (A. Elo, "The Rating of Chessplayers", 1978; the same curve
Codeforces uses for expected results between contestants) applied to problems, with each
problem's Codeforces difficulty rating r_p taken as the rating at which a contestant solves it half
the time. A model rated R solves problem p with probability

    P(R, r_p) = 1 / (1 + 10 ** ((r_p - R) / 400))

This is a one-parameter item-response (Rasch) model with fixed item difficulties; R is its maximum
likelihood estimate given the per-problem solve rates s_p = pass@1 (the fraction of samples that
pass all tests, a fractional Bernoulli outcome with weight 1 per problem). The log-likelihood
sum_p [s_p log P + (1 - s_p) log(1 - P)] is concave in R and its score equation
sum_p (s_p - P(R, r_p)) = 0 has a left side decreasing in R, so bisection finds the unique root.
When every problem is solved (or none is), the MLE is +inf (-inf): we return the search bound and
say so (``censored``). The standard error is 1 / sqrt(Fisher information)
= (400 / ln 10) / sqrt(sum_p P (1 - P)).

This is not Codeforces' contest rating (which ranks contestants within live contests, as CodeElo,
Quan et al. 2025, simulates); it estimates the same scale from problem-level results only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LO, HI = 0.0, 4000.0  # search bounds (Codeforces problem ratings run from 800 to 3500)
_SCALE = math.log(10) / 400


def solve_probability(rating: float, problem_rating: float) -> float:
    """P(R, r_p) = 1 / (1 + 10^((r_p - R) / 400))."""
    return 1.0 / (1.0 + 10.0 ** ((problem_rating - rating) / 400.0))


def fit_rating(problem_ratings: Sequence[float], solve_rates: Sequence[float], tol: float = 1e-6) -> dict:
    """MLE rating (see module doc): ``{"rating", "stderr", "censored", "problems"}``."""
    if len(problem_ratings) != len(solve_rates) or not problem_ratings:
        raise ValueError(f"need equal, non-empty lists (got {len(problem_ratings)} ratings and "
                         f"{len(solve_rates)} solve rates)")
    if any(not 0.0 <= s <= 1.0 for s in solve_rates):
        raise ValueError("solve rates must lie in [0, 1]")

    def score(r: float) -> float:
        return sum(s - solve_probability(r, rp) for rp, s in zip(problem_ratings, solve_rates))

    lo, hi = LO, HI
    censored = None
    if score(hi) >= 0:  # still under-predicting at the top bound: every problem (nearly) solved
        rating, censored = hi, "above"
    elif score(lo) <= 0:
        rating, censored = lo, "below"
    else:
        while hi - lo > tol:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if score(mid) > 0 else (lo, mid)
        rating = (lo + hi) / 2
    info = sum(solve_probability(rating, rp) * (1 - solve_probability(rating, rp)) for rp in problem_ratings)
    stderr = 1.0 / (_SCALE * math.sqrt(info)) if info > 0 else float("inf")
    return {"rating": rating, "stderr": stderr, "censored": censored, "problems": len(problem_ratings)}

"""Benchmark metrics over n samples per problem: unbiased pass@k, avg@n, maj@k, token statistics,
and the paired bootstrap behind ``vp2o eval --compare``. Pure Python (numpy for the bootstrap).

pass@k is Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1): with n
samples of which c are correct, the probability that k samples drawn without replacement contain a
correct one,

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems. It equals the average over all k-subsets of the n samples of "some sample
in the subset is correct" (tests/eval/test_metrics.py checks this by brute force). We compute it
with exact integer binomials and one correctly rounded division.

maj@k departs from "all k-subsets": it is the majority vote of the *first* k samples (ties go to
the answer seen first), so it is a plain function of the recorded samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence


def ks_for(n: int) -> list[int]:
    """The k of pass@k reported for n samples: 1, 2, 4, ... up to n."""
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got {n}")
    return [1 << i for i in range(n.bit_length()) if 1 << i <= n]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n-c, k) / C(n, k) (0 <= c <= n, 1 <= k <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(votes: Sequence, correct: Sequence[bool]) -> bool:
    """Whether the most frequent non-None vote is correct (ties: the vote seen first wins).
    ``correct[i]`` says whether sample i is correct; all samples of one vote agree on it."""
    counts: dict = {}
    for i, vote in enumerate(votes):
        if vote is not None:
            counts.setdefault(vote, [0, i])[0] += 1
    if not counts:
        return False
    best = max(counts.values(), key=lambda ci: (ci[0], -ci[1]))
    return bool(correct[best[1]])


def problem_metrics(correct: Sequence[bool], scores: Sequence[float], votes: Sequence | None = None) -> dict:
    """pass@k for k in ks_for(n), avg@n (mean score, partial credit included) and maj@k of one problem."""
    n, c = len(correct), sum(bool(x) for x in correct)
    out = {f"pass@{k}": pass_at_k(n, c, k) for k in ks_for(n)}
    out[f"avg@{n}"] = sum(scores) / n
    if votes is not None:
        for k in ks_for(n):
            out[f"maj@{k}"] = float(majority(votes[:k], correct[:k]))
    return out


def mean_over(records: Sequence[dict], key: str) -> float:
    """Mean of ``key`` over per-problem records (NaN when none has it)."""
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else float("nan")


def token_stats(tokens: Sequence[int], prefix: str = "tokens") -> dict:
    """Median and mean of per-sample token counts (the paper's Table 2 reports the median)."""
    if not tokens:
        return {}
    return {f"{prefix}/median": float(statistics.median(tokens)), f"{prefix}/mean": sum(tokens) / len(tokens)}


def bootstrap_delta(base: Sequence, new: Sequence, stat: Callable[[list], float], n_boot: int = 2000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(delta, lo, hi)``: delta = stat(new) - stat(base) on paired per-problem items, and the
    percentile bootstrap interval of that delta (problems resampled with replacement, the same
    indices for both sides)."""
    import numpy as np

    if len(base) != len(new) or not base:
        raise ValueError(f"bootstrap needs equal, non-empty paired lists (got {len(base)} and {len(new)})")
    rng = np.random.default_rng(seed)
    n = len(base)
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        deltas.append(stat([new[i] for i in idx]) - stat([base[i] for i in idx]))
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.nanpercentile(deltas, [tail, 100 - tail])
    return stat(list(new)) - stat(list(base)), float(lo), float(hi)

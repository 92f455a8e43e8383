"""digit_product: the tiny recipe's diversity task, with many correct answers per prompt.

The prompt is f"{target}*" and a response is correct iff, after stripping surrounding whitespace,
it is exactly `n_digits` digits (no separator) whose product is `target` ("36*" with n_digits 3:
"149", "194", "236", "326", "334", ... -- 21 answers). The shipped prompts draw targets among the
products with at least three ordered answers (7.6 on average for three digits), so a policy that
collapses onto one answer per prompt shows it in the distinct-correct count. The canonical answer
is the stripped response itself ("236" and "326" are two distinct answers).
"""

from collections.abc import Mapping
from functools import lru_cache
from itertools import product

from megatron_vp2o.rewards.registry import register


def _terms(meta: Mapping) -> tuple[int, int]:
    target, n_digits = meta["target"], meta["n_digits"]
    for name, value in (("target", target), ("n_digits", n_digits)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"digit_product meta[{name!r}] must be an int, got {value!r}")
    if n_digits < 1:
        raise ValueError(f"digit_product meta['n_digits'] must be >= 1, got {n_digits}")
    return target, n_digits


def digit_product_answer(response: str, meta: Mapping) -> str | None:
    """The stripped response if it is a correct answer, else None."""
    target, n_digits = _terms(meta)
    answer = response.strip()
    if len(answer) != n_digits or not all(c in "0123456789" for c in answer):
        return None
    prod = 1
    for c in answer:
        prod *= int(c)
    return answer if prod == target else None


def digit_product_reward(prompt: str, response: str, meta: Mapping) -> float:
    """1.0 for a correct response (see module docstring), else 0.0."""
    return 1.0 if digit_product_answer(response, meta) is not None else 0.0


@lru_cache(maxsize=None)
def solution_counts(n_digits: int) -> dict[int, int]:
    """{product: number of ordered n_digits-digit strings with that digit product} (0 included)."""
    counts: dict[int, int] = {}
    for digits in product(range(10), repeat=n_digits):
        prod = 1
        for d in digits:
            prod *= d
        counts[prod] = counts.get(prod, 0) + 1
    return counts


def num_solutions(target: int, n_digits: int) -> int:
    """How many distinct correct answers a prompt has."""
    return solution_counts(n_digits).get(target, 0)


register("digit_product", digit_product_reward, canonical=digit_product_answer)

"""digit_sum: the project's tiny built-in task, with several correct answers per prompt.

The prompt is f"{target}=" and a response is correct iff, after stripping surrounding whitespace,
it is exactly `n_terms` single digits joined by "+" that sum to `target` ("7=" with n_terms 2:
"3+4", "4+3" and "0+7" are all correct). It exists so the CPU main job can measure what VP2O is
for: whether the policy keeps *several* distinct correct answers alive instead of collapsing onto
one. The canonical answer of a correct response is the stripped response itself, so "3+4" and
"4+3" count as two distinct answers.
"""

from collections.abc import Mapping

from megatron_vp2o.rewards.registry import register


def _terms(meta: Mapping) -> tuple[int, int]:
    target, n_terms = meta["target"], meta["n_terms"]
    for name, value in (("target", target), ("n_terms", n_terms)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"digit_sum meta[{name!r}] must be an int, got {value!r}")
    if n_terms < 1:
        raise ValueError(f"digit_sum meta['n_terms'] must be >= 1, got {n_terms}")
    return target, n_terms


def digit_sum_answer(response: str, meta: Mapping) -> str | None:
    """The stripped response if it is a correct answer, else None."""
    target, n_terms = _terms(meta)
    answer = response.strip()
    parts = answer.split("+")
    if len(parts) != n_terms or not all(len(p) == 1 and p in "0123456789" for p in parts):
        return None
    return answer if sum(int(p) for p in parts) == target else None


def digit_sum_reward(prompt: str, response: str, meta: Mapping) -> float:
    """1.0 for a correct response (see module docstring), else 0.0."""
    return 1.0 if digit_sum_answer(response, meta) is not None else 0.0


def num_solutions(target: int, n_terms: int) -> int:
    """How many distinct correct answers a prompt has (ordered digit tuples summing to target)."""
    ways = [1] + [0] * target
    for _ in range(n_terms):
        ways = [sum(ways[t - d] for d in range(10) if 0 <= t - d) for t in range(target + 1)]
    return ways[target] if target >= 0 else 0


register("digit_sum", digit_sum_reward, canonical=digit_sum_answer)

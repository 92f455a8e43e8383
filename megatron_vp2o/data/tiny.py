"""The tiny recipe's data: digit sums, a task where one prompt has several correct answers.

Prompt ``"7="``; a correct response is ``n_terms`` single digits joined by ``+`` summing to the
target (``"3+4"``, ``"0+7"``, ...). The SFT warm-up set teaches the format with a deliberately
imperfect teacher (a fraction ``p_wrong`` of responses are off by one), so RL has reward to gain.

Rebuild the shipped file with ``vp2o make-data digit-sum --out data/sft/digit_sum_sft.jsonl``.
``digit_product_sft_rows`` is the same for the third task (a number whose digits multiply to N).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def digit_sum_sft_rows(n: int, seed: int = 0, n_terms: int = 2, p_wrong: float = 0.35) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [rng.randint(0, 9) for _ in range(n_terms)]
        target = sum(digits)
        if rng.random() < p_wrong:
            target = target + rng.choice([-1, 1]) if 0 < target < 9 * n_terms else target + 1
        rows.append({"prompt": f"{target}=", "response": "+".join(map(str, digits))})
    return rows


def digit_product_sft_rows(n: int, seed: int = 0, n_digits: int = 3, p_wrong: float = 0.35,
                           min_answers: int = 3) -> list[dict]:
    """SFT rows for digit_product (rewards/digit_product.py): prompt f"{target}*", response
    n_digits digits from 1-9; for a fraction ``p_wrong`` one digit of the response is off by one
    (so its product misses the target). Targets are the products of uniform digit strings, kept
    when they have at least ``min_answers`` ordered answers (as the RL prompts)."""
    from itertools import product

    counts: dict[int, int] = {}
    for digits in product(range(1, 10), repeat=n_digits):
        prod = 1
        for d in digits:
            prod *= d
        counts[prod] = counts.get(prod, 0) + 1
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        digits = [rng.randint(1, 9) for _ in range(n_digits)]
        target = 1
        for d in digits:
            target *= d
        if counts[target] < min_answers:
            continue
        if rng.random() < p_wrong:
            i = rng.randrange(n_digits)
            digits[i] = digits[i] + rng.choice([-1, 1]) if 1 < digits[i] < 9 else (2 if digits[i] == 1 else 8)
        rows.append({"prompt": f"{target}*", "response": "".join(map(str, digits))})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

"""The tiny recipe's data: digit sums, a task where one prompt has several correct answers.

Prompt ``"7="``; a correct response is ``n_terms`` single digits joined by ``+`` summing to the
target (``"3+4"``, ``"0+7"``, ...). The SFT warm-up set teaches the format with a deliberately
imperfect teacher (a fraction ``p_wrong`` of responses are off by one), so RL has reward to gain.

Rebuild the shipped file with ``vp2o make-data digit-sum --out data/sft/digit_sum_sft.jsonl``.
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


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

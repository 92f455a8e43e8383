"""The third tiny task: a number whose digits multiply to N (rewards/digit_product.py)."""

import json
from pathlib import Path

from megatron_vp2o.data.tiny import digit_product_sft_rows
from megatron_vp2o.generation.prompts import load_prompts, make_digit_product_prompts
from megatron_vp2o.rewards import canonical_answer, score_batch
from megatron_vp2o.rewards.digit_product import num_solutions

REPO = Path(__file__).resolve().parents[2]


def test_digit_product_correctness_and_canonical_answers():
    meta = {"target": 36, "n_digits": 3}
    cases = {"236": 1.0, "149": 1.0, " 334\n": 1.0, "66": 0.0, "1166": 0.0, "237": 0.0, "2*3*6": 0.0,
             "": 0.0, "-236": 0.0, "2 36": 0.0}
    batch = score_batch("digit_product", ["36*"] * len(cases), list(cases), [meta] * len(cases))
    assert dict(zip(cases, batch.scores)) == cases
    answers = [canonical_answer("digit_product", r, meta) for r in ["236", " 236 ", "326", "661", "999"]]
    assert answers == ["236", "236", "326", "661", None]
    # 36 = 1*4*9 (6 orders) = 1*6*6 (3) = 2*2*9 (3) = 2*3*6 (6) = 3*3*4 (3): 21 answers
    assert num_solutions(36, 3) == 21 and num_solutions(7, 3) == 3 and num_solutions(11, 3) == 0
    assert num_solutions(0, 2) == 19  # any string with a 0
    bad = score_batch("digit_product", ["x"], ["236"], [{"target": "36", "n_digits": 3}])
    assert bad.failure_counts["exception"] == 1


def test_digit_product_generator_is_deterministic_and_many_answer():
    a = make_digit_product_prompts(300, seed=5)
    assert a == make_digit_product_prompts(300, seed=5) and a != make_digit_product_prompts(300, seed=6)
    for rec in a:
        target = rec.meta["target"]
        assert rec.prompt == f"{target}*" and rec.task == "digit_product" and num_solutions(target, 3) >= 3
    mean = sum(num_solutions(r.meta["target"], 3) for r in a) / len(a)
    assert mean > 6  # many distinct correct answers per prompt on average (7.6 over the eligible targets)


def test_shipped_digit_product_files_load_and_regenerate():
    for name, n, seed in (("digit_product_train", 256, 4), ("digit_product_eval", 64, 5)):
        shipped = REPO / "data" / "prompts" / f"{name}.jsonl"
        records = load_prompts(shipped)
        assert records == make_digit_product_prompts(n, seed)
    rows = [json.loads(line) for line in (REPO / "data/sft/digit_product_sft.jsonl").read_text().splitlines()]
    assert rows == digit_product_sft_rows(4096, 6)


def test_digit_product_sft_teacher_is_right_about_two_thirds_of_the_time():
    rows = digit_product_sft_rows(2000, seed=0)
    scores = score_batch("digit_product", [r["prompt"] for r in rows], [r["response"] for r in rows],
                         [{"target": int(r["prompt"][:-1]), "n_digits": 3} for r in rows]).scores
    assert 0.55 < sum(scores) / len(scores) < 0.75
    assert all(num_solutions(int(r["prompt"][:-1]), 3) >= 3 for r in rows)

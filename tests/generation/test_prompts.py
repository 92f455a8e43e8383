"""Contract: prompt JSONL loads into records whose reward meta the rewards accept; a malformed
line fails naming file, line and field; generators are deterministic; shipped data regenerates."""

import json
from pathlib import Path

import os
import subprocess
import sys

import pytest

from megatron_vp2o import rewards
from megatron_vp2o.generation import prompts
from megatron_vp2o.generation.prompts import (PromptRecord, apply_chat_template, load_prompts,
                                      make_digit_sum_prompts, reasoning_gym_prompts)
from megatron_vp2o.rewards.digit_sum import num_solutions

REPO = Path(__file__).resolve().parents[2]
GOOD = [
    {"prompt": "What is 1/2 as a decimal?", "task": "math", "answer": "0.5", "id": 7},
    {"prompt": "Double it.", "task": "code", "tests": [{"stdin": "2", "expected_stdout": "4"}]},
    {"prompt": "Write in lowercase.", "task": "ifeval",
     "meta": {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}},
    {"prompt": "2 + 3 =", "task": "reasoning_gym",
     "meta": {"dataset": "chain_sum", "seed": 0, "index": 0}},
    {"prompt": "7=", "task": "digit_sum", "meta": {"target": 7, "n_terms": 2}},
]


def _write(tmp_path, lines) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_load_valid_prompts_and_reward_meta(tmp_path):
    records = load_prompts(_write(tmp_path, GOOD[:2] + [""] + GOOD[2:]))
    assert [r.task for r in records] == ["math", "code", "ifeval", "reasoning_gym", "digit_sum"]
    math_rec = records[0]
    assert math_rec.id == "7" and math_rec.reward_meta() == {"answer": "0.5"}
    assert records[1].reward_meta()["tests"] == GOOD[1]["tests"]
    scores = [rewards.score_batch(r.task, [r.prompt], [resp], [r.reward_meta()]).scores[0]
              for r, resp in [(records[0], "\\boxed{1/2}"), (records[2], "all lower"),
                              (records[4], "5+2")]]
    assert scores == [1.0, 1.0, 1.0]


def test_round_trip(tmp_path):
    records = load_prompts(_write(tmp_path, GOOD))
    again = load_prompts(prompts.write_prompts(records, tmp_path / "again.jsonl"))
    assert again == records


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "x", "task": "math", "answer": "1"', "invalid JSON"),
    ({"task": "math", "answer": "1"}, "'prompt'"),
    ({"prompt": 3, "task": "math", "answer": "1"}, "'prompt' must be str, got int"),
    ({"prompt": "x", "task": "poetry"}, "unknown task 'poetry'"),
    ({"prompt": "x", "task": "math"}, "missing field 'answer'"),
    ({"prompt": "x", "task": "math", "answer": ["1"]}, "'answer' must be str or int or float"),
    ({"prompt": "x", "task": "code", "tests": 3}, "'tests' must be list or str, got int"),
    ({"prompt": "x", "task": "digit_sum", "meta": []}, "'meta' must be dict, got list"),
    ({"prompt": "x", "task": "digit_sum", "meta": {"target": "7", "n_terms": 2}},
     "'meta.target' must be int, got str"),
    ({"prompt": "x", "task": "digit_sum", "meta": {"target": True, "n_terms": 2}},
     "'meta.target' must be int, got bool"),
    ({"prompt": "x", "task": "ifeval", "meta": {"kwargs": []}}, "'meta.instruction_id_list'"),
    ({"prompt": "x", "task": "reasoning_gym", "meta": {"dataset": "chain_sum"}}, "'meta.seed'"),
    ({"prompt": "x", "task": "math", "answer": "1", "promt": "y"}, "unknown field 'promt'"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, field):
    path = _write(tmp_path, [GOOD[0], GOOD[4], line])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and field in message


def test_digit_sum_generator_is_deterministic_and_multi_answer():
    a, b = make_digit_sum_prompts(200, seed=5), make_digit_sum_prompts(200, seed=5)
    assert a == b and a != make_digit_sum_prompts(200, seed=6)
    for rec in a:
        target = rec.meta["target"]
        assert rec.prompt == f"{target}=" and rec.task == "digit_sum"
        assert num_solutions(target, 2) >= 2
    assert {r.meta["target"] for r in a} == set(range(1, 18))  # every multi-answer target drawn
    three = make_digit_sum_prompts(50, seed=0, n_terms=3)
    assert all(1 <= r.meta["target"] <= 26 and r.meta["n_terms"] == 3 for r in three)


@pytest.mark.parametrize("name,n,seed", [("digit_sum_train", 256, 0), ("digit_sum_eval", 64, 1)])
def test_shipped_digit_sum_files_regenerate_byte_for_byte(tmp_path, name, n, seed):
    shipped = REPO / "data" / "prompts" / f"{name}.jsonl"
    out = tmp_path / f"{name}.jsonl"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_prompts.py"), "--digit-sum", "--n", str(n), "--seed",
                    str(seed), "--out", str(out)], check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.read_bytes() == shipped.read_bytes()
    records = load_prompts(shipped)
    assert len(records) == n and all(r.task == "digit_sum" for r in records)


def test_reasoning_gym_prompts_score_with_the_dataset_scorer():
    import reasoning_gym

    recs = reasoning_gym_prompts("chain_sum", 5, seed=3)
    assert recs == reasoning_gym_prompts("chain_sum", 5, seed=3)
    ds = reasoning_gym.create_dataset("chain_sum", size=5, seed=3)
    assert [r.prompt for r in recs] == [e["question"] for e in ds]
    metas = [r.reward_meta() for r in recs]
    gold = rewards.score_batch("reasoning_gym", [r.prompt for r in recs],
                               [f"<answer>{r.answer}</answer>" for r in recs], metas)
    wrong = rewards.score_batch("reasoning_gym", [r.prompt for r in recs], ["x"] * 5, metas)
    assert gold.scores == [1.0] * 5 and wrong.scores == [0.0] * 5


def test_apply_chat_template(char_tokenizer, chat_tokenizer):
    assert apply_chat_template(chat_tokenizer, "7=") == "<|user|>7=\n<|assistant|>"
    assert apply_chat_template(chat_tokenizer, "7=", system="be brief") == (
        "<|system|>be brief\n<|user|>7=\n<|assistant|>")

    class Wrapper:  # our tokenizer wrappers keep the HF tokenizer as `.hf`
        hf = chat_tokenizer

    assert apply_chat_template(Wrapper(), "7=") == "<|user|>7=\n<|assistant|>"
    assert apply_chat_template(char_tokenizer, "7=") == "7="  # no template: raw prompt

    class CharLike:  # like builtin:char, chat_template = None
        chat_template = None

    assert apply_chat_template(CharLike(), "7=") == "7=" == apply_chat_template(object(), "7=")


def test_record_to_json_drops_empty_fields():
    rec = PromptRecord("7=", "digit_sum", meta={"target": 7, "n_terms": 2})
    assert rec.to_json() == {"prompt": "7=", "task": "digit_sum",
                             "meta": {"target": 7, "n_terms": 2}}

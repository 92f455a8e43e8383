"""Contract: rewards agree with their reference libraries on hand-made cases, and a reward that
raises, hangs or returns a non-number becomes a recorded, counted failure, never an exception."""

import json
import math
import threading
import time

import pytest

from megatron_vp2o import rewards
from megatron_vp2o.rewards import RewardModel, canonical_answer, score_batch
from megatron_vp2o.rewards.digit_sum import num_solutions
from megatron_vp2o.rewards.ifeval import check_instructions, split_sentences
from megatron_vp2o.rewards.sandbox import bwrap_problem

_NO_BWRAP = bwrap_problem()


@pytest.fixture
def temp_reward():
    names = []

    def add(name, fn, **kwargs):
        rewards.register(name, fn, **kwargs)
        names.append(name)

    yield add
    for name in names:
        rewards.unregister(name)


def test_registry_names_choices_and_refuses_duplicates():
    assert {"math", "code", "ifeval", "reasoning_gym", "digit_sum"} <= set(rewards.available())
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*digit_sum"):
        score_batch("nope", ["p"], ["r"], [{}])
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("math", lambda p, r, m: 0.0)
    with pytest.raises(ValueError, match="equal lengths"):
        score_batch("digit_sum", ["p"], [], [])


def test_failing_rewards_are_recorded_and_counted(temp_reward):
    hang = threading.Event()
    outcomes = {"good": 0.5, "nan": math.nan, "inf": math.inf, "text": "1.0", "bool": True}

    def flaky(prompt, response, meta):
        if response == "raise":
            raise RuntimeError("boom")
        if response == "hang":
            hang.wait()
        return outcomes[response]

    temp_reward("test_flaky", flaky, max_concurrency=8)
    responses = ["good", "raise", "hang", "nan", "inf", "text", "hang", "bool"]
    start = time.monotonic()
    batch = score_batch("test_flaky", ["p"] * 8, responses, [{}] * 8, timeout_s=0.3)
    assert time.monotonic() - start < 1.5  # hanging calls time out concurrently, not in turn
    hang.set()
    assert batch.scores == [0.5, 0, 0, 0, 0, 0, 0, 1.0]
    assert [r.ok for r in batch.results] == [True] + [False] * 6 + [True]
    assert "RuntimeError: boom" in batch.results[1].reason
    assert batch.failure_counts == {"exception": 1, "timeout": 2, "non_finite": 2, "bad_output": 1}
    assert batch.num_failed == 6
    metrics = batch.metrics()
    assert metrics["reward/failed"] == 6 and metrics["reward/failed_timeout"] == 2
    assert metrics["reward/mean"] == pytest.approx(1.5 / 8)


def test_batched_reward_failures_fail_the_whole_call(temp_reward):
    temp_reward("test_short", lambda ps, rs, ms: [1.0], batched=True)
    temp_reward("test_boom", lambda ps, rs, ms: 1 / 0, batched=True)
    temp_reward("test_mixed", lambda ps, rs, ms: [1.0, math.nan], batched=True)
    for name, kind in (("test_short", "bad_output"), ("test_boom", "exception")):
        batch = score_batch(name, ["a", "b"], ["x", "y"], [{}, {}])
        assert [r.failure_kind for r in batch.results] == [kind, kind]
    mixed = score_batch("test_mixed", ["a", "b"], ["x", "y"], [{}, {}])
    assert [r.ok for r in mixed.results] == [True, False]


def test_digit_sum_correctness_and_canonical_answers():
    meta = {"target": 7, "n_terms": 2}
    cases = {"3+4": 1.0, "0+7": 1.0, " 4+3\n": 1.0, "3+5": 0.0, "7": 0.0, "3 + 4": 0.0,
             "1+2+4": 0.0, "07+0": 0.0, "-1+8": 0.0, "": 0.0, "3+4+": 0.0}
    batch = score_batch("digit_sum", ["7="] * len(cases), list(cases), [meta] * len(cases))
    assert dict(zip(cases, batch.scores)) == cases
    answers = [canonical_answer("digit_sum", r, meta) for r in ["3+4", " 3+4\n", "4+3", "0+7", "9"]]
    assert answers == ["3+4", "3+4", "4+3", "0+7", None]
    assert len({a for a in answers if a}) == 3
    assert canonical_answer("digit_sum", "1+2+4", {"target": 7, "n_terms": 3}) == "1+2+4"
    assert num_solutions(7, 2) == 8 and num_solutions(18, 2) == 1 and num_solutions(0, 3) == 1
    bad = score_batch("digit_sum", ["x"], ["3+4"], [{"target": "7", "n_terms": 2}])
    assert bad.failure_counts["exception"] == 1


@pytest.mark.parametrize("gold,response", [
    ("0.5", "\\boxed{1/2}"), ("\\frac{1}{2}", "The answer is $0.5$."), ("1/2", "\\boxed{\\frac{2}{4}}"),
    ("3", "So x = 3."), ("3", "\\boxed{4}"), ("\\sqrt{2}", "$\\sqrt{2}$"), ("10\\%", "$0.1$"),
    ("x^2+2x+1", "$(x+1)^2$"), ("2", "no answer here"), ("\\{1,2\\}", "$\\{2,1\\}$"),
])
def test_math_agrees_with_math_verify(gold, response):
    from math_verify import parse, verify

    expected = float(verify(parse(f"\\boxed{{{gold}}}"), parse(response)))
    assert score_batch("math", ["q"], [response], [{"answer": gold}]).scores == [expected]


def test_math_known_equivalences_and_canonical():
    responses = ["\\boxed{1/2}", "$\\frac{2}{4}$", "0.5", "\\boxed{0.6}"]
    batch = score_batch("math", ["q"] * 4, responses, [{"answer": "0.5"}] * 4)
    assert batch.scores == [1.0, 1.0, 1.0, 0.0] and batch.num_failed == 0
    assert canonical_answer("math", "$\\frac{2}{4}$", {"answer": "0.5"}) == "1/2"
    assert canonical_answer("math", "$0.6$", {"answer": "0.5"}) is None


IFEVAL_CASES = [  # (instruction id, kwargs, a response that follows it, one that does not)
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5},
     "one two three four", "one two three four five"),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 3},
     "it's a cat", "a cat"),
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "I like Apple PIE.", "I like apple."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "badly done", "that is Bad."),
    ("keywords:frequency", {"keyword": "go", "frequency": 2, "relation": "at least"},
     "go go", "go away"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "zoo", "Zigzag"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n- two\n* 3"),
    ("change_case:english_lowercase", {}, "all lower case here.", "Not all lower."),
    ("change_case:english_capital", {}, "ALL CAPS HERE.", "ALL CAPS HERe."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "WOW so MUCH", "WOW so much"),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     'Done. any other questions?"', "Any other questions? Yes."),
    ("startend:quotation", {}, ' "quoted" ', '"half'),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith came. He left!", "One. Two? Three!"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb", "a\n***\n\n***\nb"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\n\"Then, more.", "First.\n\nNow more."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [place]", "[x]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. PS bye"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "*one* and * *"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\na\nSection 2\nb", "Section 1\na"),
    ("detectable_format:title", {}, "<<My Poem>>\ntext", "<< >>\ntext"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("combination:two_responses", {}, "a\n******\nb", "a\n******\na"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
]


@pytest.mark.parametrize("inst_id,kwargs,good,bad", IFEVAL_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(IFEVAL_CASES)])
def test_ifeval_checkers_hand_made(inst_id, kwargs, good, bad):
    meta = {"instruction_id_list": [inst_id], "kwargs": [kwargs]}
    assert score_batch("ifeval", ["p", "p"], [good, bad], [meta, meta]).scores == [1.0, 0.0]


def test_ifeval_strict_all_loose_and_fraction():
    meta = {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
            "kwargs": [{}, {"num_words": None}]}  # None kwargs (HF rows) are dropped
    assert check_instructions("hello there", meta["instruction_id_list"], meta["kwargs"]) == [True, True]
    responses = ["hello there", "Hello there", "Hello, there"]
    batch = score_batch("ifeval", ["p"] * 3, responses, [meta] * 3)
    assert batch.scores == [1.0, 0.0, 0.0]
    frac = score_batch("ifeval", ["p"] * 3, responses, [{**meta, "score": "fraction"}] * 3)
    assert frac.scores == [1.0, 0.5, 0.0]
    title = {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
    loose = score_batch("ifeval", ["p"] * 2, ["Sure!\nall lower"] * 2,
                        [title, {**title, "mode": "loose"}])
    assert loose.scores == [0.0, 1.0]  # loose drops the first line, as lm-eval's loose score
    unknown = score_batch("ifeval", ["p"], ["x"], [{"instruction_id_list": ["language:response_language"],
                                                     "kwargs": [{"language": "en"}]}])
    assert unknown.results[0].failure_kind == "exception" and "supported" in unknown.results[0].reason
    assert split_sentences("Mr. Li came at 5 p.m. today. Then? Yes!\n\nNew para") == [
        "Mr. Li came at 5 p.m. today.", "Then?", "Yes!", "New para"]


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic", "leg_counting"])
def test_reasoning_gym_equals_score_answer(name):
    import reasoning_gym

    ds = reasoning_gym.create_dataset(name, size=4, seed=11)
    prompts, responses, metas, expected = [], [], [], []
    for i, entry in enumerate(ds):
        for answer in (entry["answer"], entry["answer"] + "1", "nonsense"):
            prompts.append(entry["question"])
            responses.append(f"thinking...<answer>{answer}</answer>")
            metas.append({"dataset": name, "seed": 11, "index": i, "size": 4})
            expected.append(float(ds.score_answer(answer, entry)))
    by_index = score_batch("reasoning_gym", prompts, responses, metas)
    assert by_index.scores == expected and by_index.num_failed == 0
    assert 1.0 in expected and min(expected) < 1.0
    entry_metas = [{"entry": json.loads(json.dumps(ds[m["index"]]))} for m in metas]
    assert score_batch("reasoning_gym", prompts, responses, entry_metas).scores == expected


@pytest.mark.skipif(_NO_BWRAP is not None, reason=f"no bwrap: {_NO_BWRAP}")
def test_code_reward_runs_tests_in_the_sandbox():
    io_tests = {"tests": [{"stdin": "3\n", "expected_stdout": "6\n"},
                          {"stdin": "5", "expected_stdout": "10  \n\n"},
                          {"stdin": "-1", "expected_stdout": "-2"}], "timeout_s": 1.0}
    responses = ["Here:\n```python\nprint(int(input()) * 2)\n```\nDone.",
                 "```python\nn = int(input())\nprint(abs(n) * 2)\n```",
                 "while True:\n    pass\n",
                 "import os\nprint(os.environ.get('HOME'))"]
    start = time.monotonic()
    batch = score_batch("code", ["p"] * 4, responses, [io_tests] * 4, timeout_s=30)
    assert batch.scores == pytest.approx([1.0, 2 / 3, 0.0, 0.0]) and batch.num_failed == 0
    assert time.monotonic() - start < 12
    asserts = {"tests": ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 5"]}
    got = score_batch("code", ["p"], ["def f(x):\n    return x + 1\n"], [asserts]).scores
    assert got == pytest.approx([2 / 3])
    bad_meta = score_batch("code", ["p"], ["print(1)"], [{"tests": [42]}])
    assert bad_meta.results[0].failure_kind == "exception"


def test_reward_model_hook_with_callable_and_local_hf_model(tmp_path, char_tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    rm = RewardModel(lambda p, r: len(r) - len(p))
    assert rm(["ab", "a"], ["abcd", "a"]) == [2.0, 0.0]
    config = transformers.BertConfig(vocab_size=len(char_tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=1,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    rm = RewardModel(model_dir=str(tmp_path), batch_size=2)
    prompts, responses = ["7=", "12=", "3="], ["3+4", "9+3", "1+1+1"]
    scores = rm(prompts, responses)
    with torch.no_grad():
        direct = [rm.model(**rm.tokenizer([p], [r], return_tensors="pt")).logits[0, 0].item()
                  for p, r in zip(prompts, responses)]
    assert scores == pytest.approx(direct, abs=1e-5) and len(set(scores)) == 3
    rm.register("test_rm")
    try:
        assert score_batch("test_rm", prompts, responses, [{}] * 3).scores == pytest.approx(scores)
    finally:
        rewards.unregister("test_rm")
    with pytest.raises(ValueError, match="label"):
        RewardModel(model_dir=str(tmp_path), label=3)


def test_reward_model_uses_the_chat_template(tmp_path, chat_tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=len(chat_tokenizer), hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=2,
                                     max_position_embeddings=64)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    chat_tokenizer.save_pretrained(tmp_path)
    rm = RewardModel(model_dir=str(tmp_path), label=1)
    text = rm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "7="}, {"role": "assistant", "content": "3+4"}],
        tokenize=False)
    assert text.startswith("<|user|>7=")
    with torch.no_grad():
        direct = rm.model(**rm.tokenizer([text], return_tensors="pt")).logits[0, 1].item()
    assert rm(["7="], ["3+4"]) == pytest.approx([direct], abs=1e-5)

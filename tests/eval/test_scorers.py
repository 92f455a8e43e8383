"""Contract: each task's scorer (through the reward registry, as `vp2o eval` calls it) gives the right
verdict on hand-made right, wrong and malformed answers; every supported IFEval instruction id has a
known pass and a known fail case; thinking blocks are split off before scoring."""


import pytest

from megatron_vp2o.eval.score import score_problems, split_thinking, summarize
from megatron_vp2o.eval.tasks import EvalItem
from megatron_vp2o.rewards.ifeval import CHECKERS
from megatron_vp2o.rewards.multiple_choice import extract_choice
from megatron_vp2o.rewards.sandbox import UNCONFINED_ENV, bwrap_problem


def verdicts(item: EvalItem, responses: list[str]) -> list[float]:
    return score_problems([item], [responses])[0]["scores"]


def test_math_right_wrong_malformed():
    item = EvalItem("p", "q", "math", {"answer": "7"})
    cases = {"\\boxed{7}": 1, "so x = 3 + 4 and the answer is $\\boxed{\\frac{14}{2}}$": 1, "7": 1,
             "The answer is 7.": 1, "\\boxed{8}": 0, "\\boxed{3} and \\boxed{7}": 0,  # two boxed answers: a set
             "\\boxed{": 0, "": 0, "<think>maybe 7</think>\\boxed{7}": 1, "<think>it is \\boxed{7}": 0}
    assert verdicts(item, list(cases)) == [float(v) for v in cases.values()]


@pytest.mark.parametrize("response, letter", [
    ("Answer: (C)", "C"), ("The answer is C.", "C"), ("**Answer:** (C)", "C"), ("answer: (B) ... Answer: (C)", "C"),
    ("\\boxed{C}", "C"), ("\\boxed{\\text{C}}", "C"), ("C", "C"), ("(C) because", "C"), ("C) because", "C"),
    ("\\boxed{A} or \\boxed{C}", None), ("(A) and (C) look plausible", None), ("The answer is a guess", None),
    ("Answer: (E)", None),  # beyond the 4 choices
    ("", None), ("I do not know.", None)])
def test_choice_extraction(response, letter):
    assert extract_choice(response, 4) == letter


def test_multiple_choice_scores_and_votes():
    item = EvalItem("p", "q", "multiple_choice", {"answer": "C", "num_choices": 4})
    rec = score_problems([item], [["Answer: (C)", "Answer: (A)", "\\boxed{C}", "hmm"]])[0]
    assert rec["scores"] == [1.0, 0.0, 1.0, 0.0] and rec["maj@4"] == 1.0 and rec["maj@2"] == 1.0


@pytest.fixture
def sandbox_env(monkeypatch):
    if bwrap_problem() is not None:
        monkeypatch.setenv(UNCONFINED_ENV, "1")  # no bubblewrap here: limits and deadline only


def test_code_right_failing_looping_crashing(sandbox_env):
    tests = [{"stdin": "1 2\n", "expected_stdout": "3\n"}, {"stdin": "5 5\n", "expected_stdout": "10\n"}]
    item = EvalItem("p", "q", "code", {"tests": tests, "timeout_s": 1.0}, rating=800.0)
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    fails_one = "```python\na, b = map(int, input().split())\nprint(3)\n```"
    loops = "```python\nwhile True:\n    pass\n```"
    crashes = "```python\nraise SystemExit(1/0)\n```"
    rec = score_problems([item], [[right, fails_one, loops, crashes, "no code at all"]])[0]
    assert rec["scores"] == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert rec["correct"] == 1 and rec["pass@1"] == pytest.approx(0.2)  # correct = every test passes
    assert summarize([rec])["rating"] > 0


IFEVAL = {  # id: (kwargs, follows, does not follow)
    "keywords:existence": ({"keywords": ["moon"]}, "The Moon rose.", "The sun rose."),
    "keywords:frequency": ({"keyword": "cat", "frequency": 3, "relation": "less than"}, "cat cat", "cat cat cat"),
    "keywords:forbidden_words": ({"forbidden_words": ["very"]}, "everybody came", "it is very good"),
    "keywords:letter_frequency": ({"letter": "a", "let_frequency": 3, "let_relation": "at least"},
                                  "banana", "bandit"),
    "length_constraints:number_sentences": ({"num_sentences": 2, "relation": "at least"}, "One. Two.", "Just one."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 3}, "a *** b *** c", "a *** b"),
    "length_constraints:number_words": ({"num_words": 4, "relation": "at least"}, "one two three four", "one two"),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "hello"},
                                                    "Hello there.\n\nBye.", "Hi there.\n\nBye."),
    "detectable_content:number_placeholders": ({"num_placeholders": 1}, "Dear [name],", "Dear friend,"),
    "detectable_content:postscript": ({"postscript_marker": "P.P.S"}, "Hi.\nP.P.S. later", "Hi. Later."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 3}, "* a\n* b\n* c", "* a\n* b"),
    "detectable_format:constrained_response": ({}, "My answer is no.", "No."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 1}, "a *key* point", "a key point"),
    "detectable_format:multiple_sections": ({"section_spliter": "PART", "num_sections": 2},
                                            "PART 1 a PART 2 b", "PART 1 a"),
    "detectable_format:json_format": ({}, '{"x": 1}', "x: 1"),
    "detectable_format:title": ({}, "<<Ode>> words", "Ode words"),
    "combination:two_responses": ({}, "first\n******\nsecond", "only one"),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Name a color."}, "Name a color. Red.", "Red."),
    "startend:end_checker": ({"end_phrase": "The end."}, "Story. The end.", "The end. Story."),
    "startend:quotation": ({}, '"all quoted"', 'not "quoted"'),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "less than"},
                                           "ONE capital", "TWO CAPS"),
    "change_case:english_capital": ({}, "SHOUTING NOW", "Shouting now"),
    "change_case:english_lowercase": ({}, "quiet now", "Quiet now"),
    "punctuation:no_comma": ({}, "no comma", "one, comma"),
}


def test_every_supported_ifeval_id_has_a_case():
    assert set(IFEVAL) == set(CHECKERS)


@pytest.mark.parametrize("inst_id", sorted(IFEVAL))
def test_ifeval_checker_pass_and_fail(inst_id):
    kwargs, good, bad = IFEVAL[inst_id]
    item = EvalItem("p", "q", "ifeval", {"instruction_id_list": [inst_id], "kwargs": [kwargs]})
    assert verdicts(item, [good, bad]) == [1.0, 0.0]


def test_ifeval_four_numbers_strict_and_loose():
    item = EvalItem("p", "q", "ifeval", {"instruction_id_list": ["change_case:english_lowercase",
                                                                 "punctuation:no_comma"], "kwargs": [{}, {}]})
    # 1: follows both; 2: a capitalised first line (only loose forgives it), no comma; 3: follows neither
    rec = score_problems([item], [["all lower", "Sure!\nall lower", "Upper, comma"]])[0]
    s = summarize([rec])
    assert (s["prompt_strict"], s["prompt_loose"]) == pytest.approx((1 / 3, 2 / 3))
    assert (s["inst_strict"], s["inst_loose"]) == pytest.approx((3 / 6, 4 / 6))
    assert s["pass@1"] == pytest.approx(1 / 3)  # correct = strict, every instruction


def test_split_thinking_and_token_counts():
    assert split_thinking("<think>a</think> b") == ("<think>a</think>", " b")
    assert split_thinking("<think>never closed") == ("<think>never closed", "")
    assert split_thinking("plain") == ("", "plain")
    item = EvalItem("p", "q", "math", {"answer": "2"})
    rec = score_problems([item], [["<think>1+1</think>\\boxed{2}", "\\boxed{2}"]], count_tokens=len)[0]
    assert rec["tokens"] == [27, 9] and rec["thinking_tokens"] == [18, 0] and rec["answer_tokens"] == [9, 9]
    s = summarize([rec])
    assert s["tokens/median"] == 18.0 and s["thinking_tokens/median"] == 9.0


class _ChatTokenizer:
    """A stand-in with a chat template: encode() maps characters to ids, encode_prompt() adds a BOS."""

    chat_template = "<u>{msg}</u><a>"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return self.chat_template.format(msg=messages[-1]["content"])

    def encode(self, text):
        if "\n" in text:
            raise ValueError("no newlines")
        return [ord(c) for c in text]

    def encode_prompt(self, text):
        return [1] + self.encode(text)


def test_prompts_go_through_the_chat_template_without_an_extra_bos():
    from megatron_vp2o.data.tokenizer import CharTokenizer
    from megatron_vp2o.eval.generate import encode_prompts
    from megatron_vp2o.eval.tasks import DataError

    assert encode_prompts(_ChatTokenizer(), ["hi"]) == [[ord(c) for c in "<u>hi</u><a>"]]
    assert encode_prompts(CharTokenizer(), ["7="]) == [[CharTokenizer.bos_id, *CharTokenizer().encode("7=")]]
    with pytest.raises(DataError, match="problem 1.*--template"):
        encode_prompts(CharTokenizer(), ["ok", "two\nlines"])

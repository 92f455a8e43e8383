"""multiple_choice: the response's chosen letter against the gold letter (GPQA, MMLU-Pro).

meta: {"answer": "C", "num_choices": 4}. The letter is read by :func:`extract_choice`, which
tolerates the usual answer formats, most explicit first:

  1. an answer statement: "Answer: (C)", "answer: C", "The answer is C", "the correct answer is **(C)**"
     (the last one in the response counts);
  2. a boxed letter: \\boxed{C}, \\boxed{(C)}, \\boxed{\\text{C}};
  3. the response starts with a letter: "C", "(C)", "C.", "C) because ..." (and names no other "(X)");
  4. a single parenthesised letter "(C)" anywhere.

Letters beyond ``num_choices`` are ignored. A hedge is no answer: several different boxed
letters, or several different parenthesised letters in rule 4 (e.g. the choices echoed back).
"""

import re
from collections.abc import Mapping

from megatron_vp2o.rewards.registry import register

LETTERS = "ABCDEFGHIJ"
_STATEMENT = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*[\*_]*\s*\(?([A-J])\)?(?![A-Za-z])")
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\s*\}")
_ALONE = re.compile(r"^\s*[\*_]*\(?([A-J])(?:[\).:]|\s*$)[\*_]*")
_PAREN = re.compile(r"\(([A-J])\)")


def extract_choice(response: str, num_choices: int = 10) -> str | None:
    """The chosen letter (upper case) or None (see the module docstring for the rules)."""
    valid = LETTERS[:num_choices]
    statements = [m.upper() for m in _STATEMENT.findall(response) if m.upper() in valid]
    if statements:
        return statements[-1]
    boxed = {m for m in _BOXED.findall(response) if m in valid}
    if boxed:
        return boxed.pop() if len(boxed) == 1 else None
    parens = {m for m in _PAREN.findall(response) if m in valid}
    alone = _ALONE.match(response)
    if alone and alone.group(1) in valid and parens <= {alone.group(1)}:
        return alone.group(1)
    return parens.pop() if len(parens) == 1 else None


def multiple_choice_reward(prompt: str, response: str, meta: Mapping) -> float:
    """1.0 if the extracted letter equals meta["answer"], else 0.0."""
    gold = str(meta["answer"]).strip().upper()
    if len(gold) != 1 or gold not in LETTERS:
        raise ValueError(f"multiple_choice meta['answer'] must be one letter A-J, got {meta['answer']!r}")
    return float(extract_choice(response, int(meta.get("num_choices", 10))) == gold)


def choice_answer(response: str, meta: Mapping) -> str | None:
    """The chosen letter when it is correct (distinct-answer counting)."""
    letter = extract_choice(response, int(meta.get("num_choices", 10)))
    return letter if letter == str(meta["answer"]).strip().upper() else None


register("multiple_choice", multiple_choice_reward, canonical=choice_answer)

"""math: final-answer equivalence checked by Hugging Face's math-verify.

The gold answer is meta["answer"], a string or a number; a bare one is read as if it were boxed
(as verl does), so "10\\%" and "\\frac{1}{2}" parse as LaTeX. math-verify extracts the final
answer of both sides (boxed answers, fractions, percentages, sets, intervals, ...) and compares
them symbolically, e.g. verify(parse("\\boxed{1/2}"), parse("0.5")) is True.
math-verify's own timeouts use SIGALRM, which only works on the main thread; `score_batch` runs
rewards in worker threads and applies its own deadline, so those timeouts are switched off here.
"""

import functools
import logging
from collections.abc import Mapping

from megatron_vp2o.rewards.registry import register


class _DropTimeoutDisabled(logging.Filter):
    """math-verify warns on every call made without its SIGALRM timeout; we time calls out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.cache
def _quiet_math_verify() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabled())


def parse_answer(text: str) -> list:
    from math_verify import parse  # optional dependency: pip install math-verify

    _quiet_math_verify()
    return parse(text, parsing_timeout=None)


def _parse_gold(answer) -> list:
    """A bare gold answer ("10\\%", "\\frac{1}{2}", 0.5) is read as if boxed, as verl does."""
    text = str(answer)
    if "$" not in text and "\\boxed" not in text:
        text = f"\\boxed{{{text}}}"
    return parse_answer(text)


def math_reward(prompt: str, response: str, meta: Mapping) -> float:
    """1.0 if the response's final answer is equivalent to meta["answer"], else 0.0."""
    from math_verify import verify

    gold = _parse_gold(meta["answer"])
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {meta['answer']!r}")
    pred = parse_answer(response)
    return 1.0 if pred and verify(gold, pred, timeout_seconds=None) else 0.0


def math_answer(response: str, meta: Mapping) -> str | None:
    """The parsed final answer in sympy's normal form ("1/2" for \\frac{2}{4}) when correct."""
    if math_reward("", response, meta) != 1.0:
        return None
    pred = parse_answer(response)
    return str(pred[0]) if pred else None


# One call at a time: math-verify's antlr LaTeX parser is not known to be thread-safe (and under
# the GIL, parallel threads would not be faster anyway).
register("math", math_reward, max_concurrency=1, canonical=math_answer)

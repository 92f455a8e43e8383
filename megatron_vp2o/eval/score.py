"""Score n responses per problem through the reward registry and summarise one benchmark.

The one scoring path of ``vp2o eval``: generated texts and ``--responses`` files both end here, so
the same texts give the same numbers. Per sample: the text after the last ``</think>`` is scored
(an opened but unclosed thinking block scores as an empty answer); a sample is *correct* when its
reward is 1.0 (math, multiple_choice: the right answer; code: every test passes; ifeval: every
instruction followed, strict). Per problem: pass@k, avg@n, maj@k (math: answers grouped by
math-verify equivalence; multiple_choice: the letter), token counts. Per benchmark: means over
problems, median/mean solution tokens (thinking vs answer tokens when a thinking block is present),
the four IFBench numbers for ifeval (prompt/instruction level x strict/loose) and, for code with
problem ratings, the Codeforces-style rating (eval/rating.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_vp2o.eval import metrics as M
from megatron_vp2o.eval.rating import fit_rating
from megatron_vp2o.eval.tasks import EvalItem
from megatron_vp2o import rewards

THINK_END, THINK_START = "</think>", "<think>"
IFEVAL_KEYS = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")


def split_thinking(text: str) -> tuple[str, str]:
    """``(thinking, answer)``: the text up to and including the last ``</think>``, and the rest."""
    if THINK_END in text:
        head, tail = text.rsplit(THINK_END, 1)
        return head + THINK_END, tail
    if THINK_START in text:
        return text, ""
    return "", text


def _reward_timeout(item: EvalItem, base: float) -> float:
    tests = item.meta.get("tests")
    if item.reward != "code" or tests is None:
        return base
    n = 1 if isinstance(tests, str) else len(tests)
    return base + 2 * n * float(item.meta.get("timeout_s", 5.0))


def _score(items: Sequence[EvalItem], answers: list[list[str]], meta_extra: dict, timeout_s: float):
    """Scores and failure reasons per item and sample, through ``rewards.score_batch``."""
    flat = [(i, text) for i, texts in enumerate(answers) for text in texts]
    task = items[0].reward
    timeout = max(_reward_timeout(it, timeout_s) for it in items)
    out = rewards.score_batch(task, [items[i].prompt for i, _ in flat], [t for _, t in flat],
                              [{**items[i].meta, **meta_extra} for i, _ in flat], timeout_s=timeout)
    scores = [[] for _ in items]
    failed = [0] * len(items)
    for (i, _), res in zip(flat, out.results):
        scores[i].append(res.score)
        failed[i] += not res.ok
    return scores, failed


def _math_votes(answers: list[str]) -> list:
    """Cluster ids of equivalent final answers (math-verify), None where nothing parses."""
    from math_verify import verify

    from megatron_vp2o.rewards.math_verify_reward import parse_answer

    reps, votes = [], []
    for text in answers:
        try:
            parsed = parse_answer(text)
        except Exception:  # noqa: BLE001 - an unparsable answer casts no vote
            parsed = []
        if not parsed:
            votes.append(None)
            continue
        match = next((j for j, rep in enumerate(reps) if verify(rep, parsed, timeout_seconds=None)), None)
        if match is None:
            reps.append(parsed)
            match = len(reps) - 1
        votes.append(match)
    return votes


def _votes(item: EvalItem, answers: list[str]) -> list | None:
    if item.reward == "math":
        return _math_votes(answers)
    if item.reward == "multiple_choice":
        from megatron_vp2o.rewards.multiple_choice import extract_choice

        return [extract_choice(a, item.meta["num_choices"]) for a in answers]
    return None


def _ifeval_fields(item: EvalItem, strict: list[float], loose: list[float]) -> dict:
    n_inst = len(item.meta["instruction_id_list"])
    return {"instructions": n_inst,
            "followed_strict": [round(s * n_inst) for s in strict],
            "followed_loose": [round(s * n_inst) for s in loose],
            "prompt_strict": sum(s == 1.0 for s in strict) / len(strict),
            "prompt_loose": sum(s == 1.0 for s in loose) / len(loose)}


def score_problems(items: Sequence[EvalItem], responses: Sequence[Sequence[str]],
                   count_tokens: Callable[[str], int] | None = None, timeout_s: float = 10.0) -> list[dict]:
    """Per-problem records for ``responses[i]`` (the samples of ``items[i]``)."""
    if len(items) != len(responses) or any(not r for r in responses):
        raise ValueError("every item needs a non-empty list of responses")
    answers = [[split_thinking(t)[1] for t in texts] for texts in responses]
    extra = {"mode": "strict", "score": "fraction"} if items[0].reward == "ifeval" else {}
    scores, failed = _score(items, answers, extra, timeout_s)
    loose = _score(items, answers, {"mode": "loose", "score": "fraction"}, timeout_s)[0] if extra else None
    records = []
    for i, item in enumerate(items):
        s = scores[i]
        correct = [x >= 1.0 for x in s]
        rec = {"id": item.id, "n": len(s), "correct": sum(correct), "scores": s, "failed": failed[i],
               **M.problem_metrics(correct, s, _votes(item, answers[i]))}
        if loose is not None:
            rec.update(_ifeval_fields(item, s, loose[i]))
        if item.rating is not None:
            rec["rating"] = item.rating
        if count_tokens is not None:
            split = [split_thinking(t) for t in responses[i]]
            rec["tokens"] = [count_tokens(t) for t in responses[i]]
            if any(th for th, _ in split):
                rec["thinking_tokens"] = [count_tokens(th) if th else 0 for th, _ in split]
                rec["answer_tokens"] = [count_tokens(a) if a else 0 for _, a in split]
        records.append(rec)
    return records


def summarize(records: Sequence[dict]) -> dict:
    """Benchmark numbers from per-problem records (means over problems, token statistics)."""
    out = {"problems": len(records), "samples": sum(r["n"] for r in records)}
    keys = [k for k in records[0] if k.split("@")[0] in ("pass", "avg", "maj")]
    out.update({k: M.mean_over(records, k) for k in keys})
    out["failed"] = sum(r["failed"] for r in records)
    for name in ("tokens", "thinking_tokens", "answer_tokens"):
        flat = [t for r in records for t in r.get(name, [])]
        out.update(M.token_stats(flat, name))
    if "instructions" in records[0]:
        out.update(ifeval_numbers(records))
    rated = [r for r in records if "rating" in r]
    if rated:
        fit = fit_rating([r["rating"] for r in rated], [r["pass@1"] for r in rated])
        out.update({"rating": fit["rating"], "rating/stderr": fit["stderr"], "rating/censored": fit["censored"],
                    "rating/problems": fit["problems"]})
    return out


def ifeval_numbers(records: Sequence[dict]) -> dict:
    """The four IFBench numbers: prompt-level (every instruction followed) and instruction-level
    (fraction of instructions followed), strict and loose, over all samples."""
    n = [len(r["followed_strict"]) for r in records]  # samples (over all checkpoints when merged)
    samples, insts = sum(n), sum(r["instructions"] * k for r, k in zip(records, n))
    return {"prompt_strict": sum(r["prompt_strict"] * k for r, k in zip(records, n)) / samples,
            "prompt_loose": sum(r["prompt_loose"] * k for r, k in zip(records, n)) / samples,
            "inst_strict": sum(sum(r["followed_strict"]) for r in records) / insts,
            "inst_loose": sum(sum(r["followed_loose"]) for r in records) / insts}


def score_benchmark(items, responses, count_tokens=None, timeout_s: float = 10.0) -> dict:
    """``{"summary": ..., "problems": [...]}`` for one benchmark."""
    records = score_problems(items, responses, count_tokens, timeout_s)
    return {"summary": summarize(records), "problems": records}

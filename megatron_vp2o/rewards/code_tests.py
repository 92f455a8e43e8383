"""code: run the response's program against the prompt's tests in the sandbox; score = fraction
of tests passed.

The program is the last ```python (or bare ```) block of the response, or the whole response if it
has none. meta["tests"] is either
  * a list of {"stdin": str, "expected_stdout": str}: run the program with that stdin; it passes
    if it exits 0 and its stdout equals the expected one up to trailing whitespace on each line
    and trailing blank lines; or
  * a str, or a list of str: assert-based test source appended to the program; a test passes if
    the combined program exits 0.
Optional meta keys: "timeout_s" (per test, default 5) and "memory_mb" (default 512). Every test is
a separate sandboxed run (`run_many`), so one crashing test does not hide the others. The
`score_batch` deadline of a sample should cover its tests: about len(tests) * timeout_s /
sandbox.max_concurrent() when the batch saturates the sandbox slots.
"""

import re
from collections.abc import Mapping

from megatron_vp2o.rewards import sandbox
from megatron_vp2o.rewards.registry import register

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last fenced Python block of `response`, or the whole response without fences."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def _normalize(stdout: str) -> list[str]:
    lines = [line.rstrip() for line in stdout.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _jobs(code: str, tests, limits: sandbox.SandboxLimits) -> list[tuple[dict, str | None]]:
    """(run_python kwargs, expected stdout or None for assert-based) per test."""
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"code meta['tests'] must be a non-empty list or a str, got {tests!r}")
    jobs = []
    for test in tests:
        if isinstance(test, str):
            jobs.append(({"source": f"{code}\n\n{test}\n", "limits": limits}, None))
        elif isinstance(test, Mapping) and "expected_stdout" in test:
            stdin = str(test.get("stdin", ""))
            jobs.append(({"source": code, "stdin": stdin, "limits": limits},
                         str(test["expected_stdout"])))
        else:
            raise ValueError(f"a code test must be a str or a {{stdin, expected_stdout}} dict, "
                             f"got {test!r}")
    return jobs


def code_reward(prompt: str, response: str, meta: Mapping) -> float:
    """Fraction of meta["tests"] the response's program passes."""
    limits = sandbox.SandboxLimits(timeout_s=float(meta.get("timeout_s", 5.0)),
                                   memory_mb=int(meta.get("memory_mb", 512)))
    jobs = _jobs(extract_code(response), meta["tests"], limits)
    results = sandbox.run_many([kwargs for kwargs, _ in jobs])
    passed = 0
    for (_, expected), res in zip(jobs, results):
        if res.ok and (expected is None or _normalize(res.stdout) == _normalize(expected)):
            passed += 1
    return passed / len(jobs)


register("code", code_reward, max_concurrency=sandbox.max_concurrent())

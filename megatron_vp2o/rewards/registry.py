"""Reward functions by name, and `score_batch`: per-sample isolation so no reward ever breaks a step.

A reward function scores one rollout: `fn(prompt, response, meta) -> float` (or, registered with
`batched=True`, `fn(prompts, responses, metas) -> list[float]` in one call, for reward models).
`score_batch` runs every call in a daemon worker thread with its own deadline. A call that raises,
outlives its deadline, or returns something that is not a finite number becomes a *recorded
failure* for its sample (score 0.0, ok False, a reason "<kind>: <detail>") and is counted in the
returned `BatchScores`; the trainer logs `BatchScores.metrics()` and never sees an exception.

Threads rather than processes: rewards are mostly I/O-bound (sandboxed code, reward models) or
short, and a process per call would cost more than most rewards. The price: a timed-out call
cannot be killed, only abandoned; its thread finishes (or not) in the background. Rewards that run
untrusted code must bound themselves (the code reward uses the sandbox's own timeouts).
"""

import collections
import dataclasses
import math
import numbers
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence

FAILURE_KINDS = ("exception", "timeout", "non_finite", "bad_output")


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """One sample's reward. A failed call has score 0.0, ok False and reason "<kind>: <detail>"."""

    score: float
    ok: bool = True
    reason: str | None = None

    @property
    def failure_kind(self) -> str | None:
        return None if self.ok else (self.reason or "exception").split(":", 1)[0]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A registered reward function and how to call it."""

    name: str
    fn: Callable
    batched: bool = False  # fn(prompts, responses, metas) -> list[float], one call per batch
    max_concurrency: int = 8  # calls in flight at once (each with its own deadline)
    canonical: Callable[[str, Mapping], str | None] | None = None  # see canonical_answer


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """The per-sample results of `score_batch`, with failure counts for logging."""

    task: str
    results: list[RewardResult]

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.results]

    @property
    def num_failed(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def failure_counts(self) -> dict[str, int]:
        counts = collections.Counter(r.failure_kind for r in self.results if not r.ok)
        return {kind: counts.get(kind, 0) for kind in FAILURE_KINDS}

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        n = max(1, len(self.results))
        out = {f"{prefix}/mean": sum(self.scores) / n, f"{prefix}/failed": float(self.num_failed)}
        out.update({f"{prefix}/failed_{k}": float(v) for k, v in self.failure_counts.items()})
        return out


_REGISTRY: dict[str, RewardSpec] = {}


def register(name: str, fn: Callable | None = None, *, batched: bool = False,
             max_concurrency: int = 8, canonical: Callable | None = None,
             overwrite: bool = False):
    """Register `fn` under `name`; usable as a decorator (`@register("math")`)."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")

    def add(f: Callable) -> Callable:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = RewardSpec(name, f, batched, max_concurrency, canonical)
        return f

    return add if fn is None else add(fn)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> RewardSpec:
    """The spec registered under `name`; an unknown name raises ValueError listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; choose one of {available()}") from None


def _as_score(value) -> tuple[float | None, str | None]:
    """Validate one returned score: (score, None) or (None, failure reason)."""
    if isinstance(value, RewardResult):
        return (value.score, None) if value.ok else (None, value.reason or "exception: failed")
    if not isinstance(value, numbers.Real):  # bool, int, float and numpy scalars pass
        return None, f"bad_output: returned {type(value).__name__}, not a number"
    if not math.isfinite(value):
        return None, f"non_finite: returned {value}"
    return float(value), None


def run_with_deadlines(calls: Sequence[Callable[[], object]], timeout_s: float,
                       max_workers: int) -> list[tuple[object, str | None]]:
    """Run each zero-argument call in its own daemon thread, at most `max_workers` at once; each
    gets `timeout_s` from its start. Returns (value, None) or (None, "<kind>: <detail>") per call."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    out: list = [None] * len(calls)
    pending = collections.deque(range(len(calls)))
    active: dict[int, float] = {}  # call index -> deadline

    def work(i: int) -> None:
        try:
            done.put((i, calls[i](), None))
        except BaseException as err:  # noqa: BLE001 - a reward must never break the caller
            done.put((i, None, f"exception: {type(err).__name__}: {err}"))

    while pending or active:
        while pending and len(active) < max_workers:
            i = pending.popleft()
            active[i] = time.monotonic() + timeout_s
            threading.Thread(target=work, args=(i,), daemon=True, name=f"reward-{i}").start()
        try:
            i, value, err = done.get(timeout=max(0.0, min(active.values()) - time.monotonic()))
            if i in active:  # a late answer of an abandoned call is ignored
                del active[i]
                out[i] = (value, err)
        except queue.Empty:
            pass
        now = time.monotonic()
        for i in [i for i, deadline in active.items() if deadline <= now]:
            del active[i]
            out[i] = (None, f"timeout: no result within {timeout_s:g} s")
    return out


def score_batch(task_name: str, prompts: Sequence[str], responses: Sequence[str],
                metas: Sequence[Mapping], timeout_s: float = 10.0) -> BatchScores:
    """Score every (prompt, response, meta) with the reward registered as `task_name`.

    Failures are per sample and recorded, never raised; only caller errors raise (ValueError for
    an unknown task, mismatched lengths or a non-positive timeout)."""
    spec = get(task_name)
    if not len(prompts) == len(responses) == len(metas):
        raise ValueError(f"score_batch: {len(prompts)} prompts, {len(responses)} responses and "
                         f"{len(metas)} metas must have equal lengths")
    if not timeout_s > 0:
        raise ValueError(f"score_batch: timeout_s must be > 0, got {timeout_s}")
    if not prompts:
        return BatchScores(task_name, [])
    if spec.batched:
        results = _score_batched(spec, prompts, responses, metas, timeout_s)
    else:
        calls = [_bind(spec.fn, p, r, m) for p, r, m in zip(prompts, responses, metas)]
        outcomes = run_with_deadlines(calls, timeout_s, spec.max_concurrency)
        results = [_to_result(value, err) for value, err in outcomes]
    return BatchScores(task_name, results)


def _bind(fn: Callable, *args) -> Callable[[], object]:
    return lambda: fn(*args)


def _to_result(value, err: str | None) -> RewardResult:
    score, err = (None, err) if err else _as_score(value)
    return RewardResult(0.0, False, err) if err else RewardResult(score)


def _score_batched(spec: RewardSpec, prompts, responses, metas, timeout_s) -> list[RewardResult]:
    call = _bind(spec.fn, list(prompts), list(responses), list(metas))
    [(values, err)] = run_with_deadlines([call], timeout_s, 1)
    if err is None and (not isinstance(values, Sequence) or len(values) != len(prompts)):
        err = f"bad_output: expected {len(prompts)} scores, got {type(values).__name__}"
    if err:
        return [RewardResult(0.0, False, err) for _ in prompts]
    return [_to_result(v, None) for v in values]


def canonical_answer(task: str, response: str, meta: Mapping, prompt: str = "") -> str | None:
    """The normalized form of a correct `response` (None if incorrect or unscorable), so the
    trainer can count distinct correct answers per prompt. Tasks without their own canonicalizer
    use the whitespace-collapsed response when it scores 1.0."""
    spec = get(task)
    try:
        if spec.canonical is not None:
            return spec.canonical(response, meta)
        score = (spec.fn([prompt], [response], [meta])[0] if spec.batched
                 else spec.fn(prompt, response, meta))
        return " ".join(response.split()) if _as_score(score)[0] == 1.0 else None
    except Exception:  # noqa: BLE001 - an unscorable answer is simply not a correct one
        return None

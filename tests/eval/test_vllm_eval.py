"""Contract: `vp2o eval --engine vllm` generates with vLLM loaded from the checkpoint (the training refresh's
streamed weight sync) and scores with the same reward code as `--engine megatron`. On the shipped tiny policy:
greedy, the two engines give the same response to at least 95% of 105 prompts (measured: 105 of 105), a
response both engines gave gets the same score, and the mean rewards differ by at most the disagreeing share;
sampled (temperature 1, 8 samples of each of the 64 `rl.eval_prompts`), the mean rewards lie within 3 standard
errors of each other (paired by problem; measured 0.596 megatron vs 0.627 vLLM, 1.05 standard errors apart).
`--engine vllm` without vLLM, or with rl.vllm.tp not dividing the ranks, is refused in one line, exit code 2, nothing written."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/tiny_cpu.yaml"
LABEL = "tiny_policy-iter_0001000"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
AGREE_MIN = 0.95  # greedy: share of prompts both engines answer alike (fp32; ~1e-4 log-prob gaps flip near-ties)
SE_MAX = 3.0  # sampled: |mean reward difference| in standard errors of the per-problem differences


def _eval(out: Path, engine: str, benches: list, options=(), overrides=(), env: dict | None = None, nproc: int = 1):
    from e2e.test_sft import entry

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT), **(env or {}))
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [*entry(nproc), "eval", "--ckpt", "checkpoints/tiny_policy",
           "--config", CONFIG, "--template", "{problem}", "--engine", engine, "--out", str(out), *options]
    for path in benches:
        cmd += ["--task", "math", "--data", str(path)]
    cmd += ["rl.vllm.kv_cache_bytes=268435456", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _benchmarks(where: Path) -> tuple[list, list]:
    """Greedy: the shipped digit-sum sample and the bare prompts '0=' .. '99=' (math layout, 105 problems);
    sampled: the tiny recipe's 64 rl.eval_prompts in the math layout (its answer is the target sum)."""
    numbers = _write(where / "numbers.jsonl", [{"id": f"n{n}", "problem": f"{n}=", "answer": str(n)}
                                               for n in range(100)])
    rows = [json.loads(line) for line in (ROOT / "data/prompts/digit_sum_eval.jsonl").read_text().splitlines()]
    rl_eval = _write(where / "rl_eval.jsonl", [{"id": f"e{i}", "problem": r["prompt"],
                                                "answer": str(r["meta"]["target"])} for i, r in enumerate(rows)])
    return [ROOT / "data/eval/math_digit_sum.jsonl", numbers], [rl_eval]


def _read(out: Path) -> dict:
    """{benchmark: [(problem id, responses, scores)]} of a finished run."""
    (ck,) = json.loads((out / "results.json").read_text())["checkpoints"]
    runs = {}
    for name, res in ck["results"].items():
        lines = (out / "responses" / LABEL / f"{name}.jsonl").read_text().splitlines()
        texts = [json.loads(line)["responses"] for line in lines]
        runs[name] = [(p["id"], t, p["scores"]) for p, t in zip(res["problems"], texts)]
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    where = tmp_path_factory.mktemp("vllm_eval")
    greedy, sampled = _benchmarks(where)
    out = {}
    for engine in ("megatron", "vllm"):
        for mode, benches, samples, overrides in (("greedy", greedy, "1", ["rl.sampling.temperature=0"]),
                                                  ("sampled", sampled, "8", [])):
            proc = _eval(where / f"{mode}_{engine}", engine, benches, ["--samples", samples], overrides,
                         env={"PYTHONWARNINGS": "ignore"})
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            out[mode, engine] = _read(where / f"{mode}_{engine}")
    return out


def _mean(rows) -> float:
    return statistics.fmean(s for _, _, scores in rows for s in scores)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_greedy_responses_and_rewards_agree(runs):
    ours, theirs = runs["greedy", "megatron"], runs["greedy", "vllm"]
    pairs = [(a, b) for name in ours for a, b in zip(ours[name], theirs[name])]
    assert len(pairs) == 105 and all(a[0] == b[0] for a, b in pairs)
    agree = sum(a[1] == b[1] for a, b in pairs) / len(pairs)
    rows_m, rows_v = [r for rows in ours.values() for r in rows], [r for rows in theirs.values() for r in rows]
    mean_m, mean_v = _mean(rows_m), _mean(rows_v)
    print(f"greedy: {agree:.3f} of {len(pairs)} responses equal; mean reward megatron {mean_m:.4f} vllm {mean_v:.4f}")
    assert agree >= AGREE_MIN, [(a[1], b[1]) for a, b in pairs if a[1] != b[1]]
    assert abs(mean_m - mean_v) <= 1 - agree + 1e-9, (mean_m, mean_v, agree)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_greedy_eval_on_one_engine_over_two_ranks(runs, tmp_path):
    """torchrun, 2 ranks, rl.vllm.tp=2: both ranks' problems go through the one engine (its pool) and each
    rank gets its own problems' answers back: the same answers as the single-process vLLM run."""
    greedy, _ = _benchmarks(tmp_path)
    proc = _eval(tmp_path / "tp2", "vllm", greedy, ["--samples", "1"], ["rl.sampling.temperature=0", "rl.vllm.tp=2"],
                 env={"PYTHONWARNINGS": "ignore"}, nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ours, single = _read(tmp_path / "tp2"), runs["greedy", "vllm"]
    pairs = [(a, b) for name in single for a, b in zip(ours[name], single[name])]
    assert len(pairs) == 105 and all(a[0] == b[0] for a, b in pairs)
    agree = sum(a[1] == b[1] for a, b in pairs) / len(pairs)
    print(f"greedy, one engine over 2 ranks: {agree:.3f} of {len(pairs)} responses equal to one process's")
    assert agree >= AGREE_MIN, [(a[1], b[1]) for a, b in pairs if a[1] != b[1]]


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_same_response_same_score(runs):
    """One scorer: every (problem, response) text that both engines produced scored alike, in every run."""
    for mode in ("greedy", "sampled"):
        scored: dict = {}
        for engine in ("megatron", "vllm"):
            for name, rows in runs[mode, engine].items():
                for pid, texts, scores in rows:
                    for text, score in zip(texts, scores, strict=True):
                        scored.setdefault((name, pid, text), {}).setdefault(engine, set()).add(score)
        shared = [by_engine for by_engine in scored.values() if len(by_engine) == 2]
        assert len(shared) >= 50, (mode, len(shared))
        assert all(len(set.union(*by_engine.values())) == 1 for by_engine in shared)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_sampled_mean_rewards_within_interval(runs):
    (ours,), (theirs,) = runs["sampled", "megatron"].values(), runs["sampled", "vllm"].values()
    diffs = [statistics.fmean(b[2]) - statistics.fmean(a[2]) for a, b in zip(ours, theirs)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean_m, mean_v = _mean(ours), _mean(theirs)
    print(f"sampled: mean reward megatron {mean_m:.4f} vllm {mean_v:.4f} over {sum(len(r[2]) for r in ours)} "
          f"samples each; difference {mean_v - mean_m:+.4f} = {(mean_v - mean_m) / se:+.2f} standard errors")
    assert len(diffs) == 64 and all(len(r[2]) == 8 for r in ours + theirs)
    assert abs(mean_v - mean_m) <= SE_MAX * se, (mean_m, mean_v, se)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_vllm_eval_without_vllm_is_refused(tmp_path):
    proc = _eval(tmp_path / "run", "vllm", [ROOT / "data/eval/math_digit_sum.jsonl"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "--engine vllm: vLLM is not installed" in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_vllm_eval_with_an_engine_wider_than_the_world_is_refused(tmp_path):
    proc = _eval(tmp_path / "run", "vllm", [ROOT / "data/eval/math_digit_sum.jsonl"], overrides=["rl.vllm.tp=4"],
                 env={"WORLD_SIZE": "2", "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "--engine vllm: rl.vllm.tp=4 must divide the number of ranks (2)" in lines[0], lines
    assert not (tmp_path / "run").exists()

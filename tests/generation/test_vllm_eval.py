"""Contract: `vp2o eval --engine vllm` generates with vLLM loaded from the checkpoint (the training
refresh's streamed weight sync) and scores with the same reward code: greedy decoding of the shipped
tiny policy on the digit-sum benchmark gives the same responses, hence the same scores, as our
megatron engine (fp32; the two engines' log-probs agree to ~1e-4, so argmax ties are the only
possible difference). Without vLLM, `--engine vllm` is refused in one line, exit 2."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ["--task", "math", "--data", "data/eval/math_digit_sum.jsonl", "--template", "{problem}"]


def _eval(out, engine):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_vp2o.cli.main", "eval", "--ckpt", "checkpoints/tiny_policy",
           "--config", "examples/configs/tiny_cpu.yaml", *BENCH, "--samples", "2", "--engine", engine,
           "--out", str(out), "rl.sampling.temperature=0", "rl.vllm.kv_cache_bytes=268435456"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _responses(out: Path) -> list:
    (path,) = (out / "responses").glob("*/math_digit_sum.jsonl")
    return [json.loads(line)["responses"] for line in path.read_text().splitlines()]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make test-vllm)")
def test_vllm_and_megatron_engines_agree_greedily(tmp_path):
    runs = {}
    for engine in ("megatron", "vllm"):
        proc = _eval(tmp_path / engine, engine)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        runs[engine] = (_responses(tmp_path / engine),
                        json.loads((tmp_path / engine / "results.json").read_text()))
    ours, theirs = runs["megatron"][0], runs["vllm"][0]
    pairs = [(a, b) for x, y in zip(ours, theirs) for a, b in zip(x, y)]
    agree = sum(a == b for a, b in pairs) / len(pairs)
    print(f"greedy agreement megatron vs vLLM: {agree:.3f} of {len(pairs)} responses")
    assert len(pairs) == 10 and agree == 1.0, pairs
    assert json.dumps(runs["megatron"][1]).count("avg@") > 0
    summary = lambda r: [ck["results"]["math_digit_sum"]["summary"] for ck in r["checkpoints"]]  # noqa: E731
    assert summary(runs["megatron"][1]) == summary(runs["vllm"][1])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_eval_without_vllm_is_refused(tmp_path):
    proc = _eval(tmp_path / "run", "vllm")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "--engine vllm: vLLM is not installed" in lines[0], lines
    assert not (tmp_path / "run").exists()

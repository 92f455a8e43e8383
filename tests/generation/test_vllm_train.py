"""Contract: `vp2o train rl.engine=vllm` on the tiny recipe raises the eval reward as the megatron engine
does (one process; torchrun DP=2 sharing one engine, a pp=2 learner, a tp=2 learner), refreshing vLLM from the learner before every rollout batch (weight version +1 each time) with
the engine's sampled-token log-probs within 1e-3 of the learner's; without vLLM it is refused in one line."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _train(out, *overrides, nproc: int = 1):
    from e2e.test_sft import entry

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT))
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [*entry(nproc), "train", "--config", "examples/configs/tiny_cpu.yaml",
           "--out", str(out), "rl.engine=vllm", "rl.vllm.kv_cache_bytes=268435456", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make test-vllm)")
def test_vllm_engine_trains_the_tiny_recipe(tmp_path):
    proc = _train(tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/mean"] for r in rows if "eval/mean" in r]
    assert evals[-1] > evals[0], evals
    refreshed = [r for r in rows if r.get("vp2o/refreshed")]
    assert refreshed and all("rollout/mismatch_max_abs" in r for r in refreshed)
    assert max(r["rollout/mismatch_max_abs"] for r in refreshed) < 1e-3
    versions = [r["rollout/weight_version"] for r in refreshed]
    assert versions == list(range(versions[0], versions[0] + len(versions)))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make test-vllm)")
@pytest.mark.parametrize("layout", [
    ("rl.vllm.tp=2",),  # DP=2 sharing one tensor-parallel engine
    ("parallel.pp=2",),  # a pipeline learner: both stages must hold the same rollouts
    ("parallel.tp=2", "parallel.sequence_parallel=true", "rl.vllm.tp=2"),  # a tensor-parallel learner next to a tensor-parallel engine
], ids=["dp2_one_engine", "pp2_learner", "tp2_learner_tp2_engine"])
def test_two_rank_layouts_train_on_vllm(tmp_path, layout):
    """torchrun, 2 ranks (docs/vllm.md, engine pools): the eval reward rises, and the engine's log-probs
    match the learner's forward (a stage or rank with other rollouts would not)."""
    proc = _train(tmp_path / "run", *layout, "logging.progress=false", nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/mean"] for r in rows if "eval/mean" in r]
    assert evals[-1] > evals[0], evals
    refreshed = [r for r in rows if r.get("vp2o/refreshed")]
    assert refreshed and max(r["rollout/mismatch_max_abs"] for r in refreshed) < 1e-3
    versions = [r["rollout/weight_version"] for r in refreshed]
    assert versions == list(range(versions[0], versions[0] + len(versions)))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_engine_without_vllm_is_refused(tmp_path):
    proc = _train(tmp_path / "run", "rl.steps=1")
    assert proc.returncode == 2 and "rl.engine=vllm" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

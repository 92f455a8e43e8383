"""Contract: `vp2o train rl.engine=vllm rl.engine_is_cap=2` runs the tiny recipe with vLLM's sampled-token
log-probs kept in the buffer and weighting the advantages: every refresh logs rollout/is_weight_mean within
1e-3 of 1 (fp32 CPU: engine and learner agree within 1e-3) and rollout/is_capped_frac = 0."""

import importlib.util
import json

import pytest

from generation.test_vllm_train import _train


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make test-vllm)")
def test_vllm_engine_is_weights_logged(tmp_path):
    proc = _train(tmp_path / "run", "rl.engine_is_cap=2", "rl.steps=4", "rl.eval_prompts=null")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    refreshed = [r for r in rows if r.get("vp2o/refreshed")]
    assert refreshed and all("rollout/is_weight_mean" in r for r in refreshed)
    print({k: [r[k] for r in refreshed] for k in ("rollout/is_weight_mean", "rollout/is_capped_frac",
                                                  "rollout/mismatch_max_abs")})
    assert all(abs(r["rollout/is_weight_mean"] - 1.0) < 1e-3 and r["rollout/is_capped_frac"] == 0.0
               for r in refreshed)

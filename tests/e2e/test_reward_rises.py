"""Contract: `vp2o train` of the tiny recipe (VP2O, one process) raises the eval reward, with no
skipped step, on whichever megatron-core this suite runs under (make test: 0.16.1; make
test-latest: 0.19.2). CPU runs are bitwise reproducible, so this is a fixed trajectory per release,
not a flaky sample: 16 learner steps from checkpoints/tiny_policy. (lr 1e-3: since the anchor budget
judges each step by its own routing, 1.5e-3 spends most steps on backtracks and rejects.)"""

from __future__ import annotations

import json

from e2e.test_sft import TINY, vp2o


def test_tiny_recipe_raises_the_eval_reward(tmp_path):
    out = tmp_path / "run"
    proc = vp2o(["train", "--config", TINY, "--out", str(out), "rl.steps=16", "rl.lr=1e-3",
                 "rl.prompts_per_step=16", "logging.progress=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/mean"] for r in records if "eval/mean" in r]
    assert len(evals) >= 2 and evals[-1] > evals[0] + 0.03, evals
    assert not any(r.get("skipped") for r in records)
    assert any(r.get("vp2o/refresh_reason") not in (None, "none") for r in records)

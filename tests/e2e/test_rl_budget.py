"""Contract: a real `vp2o train` run logs its rollout cost and ends at rl.budget.samples; GRPO takes
rl.grpo.mini_batches x rl.grpo.epochs optimizer steps per rollout batch with the clip binding after the first;
VP2O refreshes exactly on the steps whose logged reason says so."""

from __future__ import annotations

import json

from e2e.test_rl import QUICK
from e2e.test_sft import TINY, vp2o

PER_BATCH = 16  # QUICK: 4 prompts x 4 samples


def _train(tmp_path, name, *overrides):
    out = tmp_path / name
    proc = vp2o(["train", "--config", TINY, "--out", str(out), *QUICK, *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_mini_batches_clip_and_budget(tmp_path):
    rows = _train(tmp_path, "grpo", "rl.algo=grpo", "rl.steps=50", "rl.budget.samples=48", "rl.grpo.mini_batches=2",
                  "rl.grpo.epochs=2", "rl.lr=3e-3", "rl.grpo.clip_eps=0.2")
    assert [r["rollout/samples"] for r in rows] == [PER_BATCH, 2 * PER_BATCH, 3 * PER_BATCH]  # budget: 3 batches
    assert rows[-1].get("budget_end") and [r["vp2o/refresh_reason"] for r in rows] == ["start"] + ["every_step"] * 2
    assert all(r["grpo/optimizer_steps"] == 4 for r in rows)
    assert all(r["rollout/tokens"] > r["rollout/samples"] for r in rows)  # responses have several tokens
    # the first optimizer step of a batch has ratio 1; later ones move it, and the clip binds somewhere
    assert max(abs(r["grpo/ratio_mean"] - 1.0) for r in rows) > 1e-4
    assert max(r["grpo/clip_fraction"] for r in rows) > 0.0
    assert all(r["timing/elapsed_s"] > 0 for r in rows)


def test_vp2o_refreshes_only_with_a_reason(tmp_path):
    rows = _train(tmp_path, "vp2o", "rl.steps=8", "vp2o.trust_region.max_steps_per_refresh=3")
    reasons = [r["vp2o/refresh_reason"] for r in rows]
    refreshes = [r["vp2o/refreshes"] for r in rows]
    assert reasons[0] == "start" and refreshes[0] == 1
    for prev, row, n_prev, n in zip(rows, rows[1:], refreshes, refreshes[1:]):
        refreshed = row["vp2o/refresh_reason"] != "none"
        assert n - n_prev == int(refreshed)
        assert row["rollout/samples"] - prev["rollout/samples"] == PER_BATCH * int(refreshed)
        assert ("reward/mean" in row) == refreshed  # no stale reward rows
    assert set(reasons) <= {"start", "drift", "ess", "anchor", "max_steps", "none"}

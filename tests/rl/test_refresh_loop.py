"""Contract: the RL loop takes one refresh decision per step (rl.trainer.refresh_decision, through
algo.trust_region.refresh_reason, on the current buffer's statistics, NaN = violation); each reason
causes exactly one refresh; a buffer kept by the rule gets learner steps until the rule fires again;
the switches that turn the rule off refresh every step. Driven with scripted statistics and anchor
verdicts on the real loop code (trainer.rl_step) -- the session and its learner are a script (the
learner answers with the declared StepOutcome), nothing else is faked."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_vp2o.algo import trust_region as tr
from megatron_vp2o.config import load_config
from megatron_vp2o.rl.batches import RLBatch, mini_batches
from megatron_vp2o.rl.learner import StepOutcome
from megatron_vp2o.rl.trainer import REFRESH_REASONS, LoopState, budget_spent, rl_step

OK = {"drift": 0.001, "ess": 0.99}
SAMPLES = 4  # responses per scripted rollout batch


class ScriptedSession:
    """What rl_step needs from a Session (and its learner: itself), answering from scripts: ``stats[i]``
    is what the i-th call of behaviour_stats returns; ``decisions[i]`` the anchor decision of the i-th
    learner update."""

    def __init__(self, cfg, stats=(), decisions=(), nan_adv_at=()):
        self.cfg, self.stats, self.decisions, self.nan_adv_at = cfg, list(stats), list(decisions), set(nan_adv_at)
        self.rollouts = self.stat_calls = self.updates = 0
        self.learner, self.batches = self, []

    def rollout(self, index):
        self.rollouts += 1
        adv = torch.full((SAMPLES,), math.nan if self.rollouts in self.nan_adv_at else 0.5)
        return SimpleNamespace(adv_B=adv)

    def reward_metrics(self, batch):
        return {"reward/mean": 0.5, "rollout/new_samples": SAMPLES, "rollout/new_tokens": 3 * SAMPLES}

    def set_buffer(self, batch):
        return ["anchors"]

    def behaviour_stats(self):
        self.stat_calls += 1
        return self.stats[self.stat_calls - 1] if self.stat_calls <= len(self.stats) else OK

    def step(self, batches, anchors):
        self.updates += 1
        decision = self.decisions[self.updates - 1] if self.updates <= len(self.decisions) else "accept"
        return StepOutcome(loss=0.0, decision=tr.DECISION_NAMES.index(decision))


def _cfg(*overrides):
    return load_config("examples/configs/tiny_cpu.yaml", ["vp2o.trust_region.max_steps_per_refresh=50", *overrides])


def _run(sess, steps):
    state, rows = LoopState(), []
    for _ in range(steps):
        rows.append(rl_step(sess, state))
    return state, [r["vp2o/refresh_reason"] for r in rows], rows


BAD = {"drift": {"drift": 0.5, "ess": 0.99}, "drift_nan": {"drift": math.nan, "ess": 0.99},
       "ess": {"drift": 0.001, "ess": 0.1}, "ess_nan": {"drift": 0.001, "ess": math.nan}}


@pytest.mark.parametrize("case", ["drift", "drift_nan", "ess", "ess_nan", "anchor_reject", "anchor_refresh",
                                  "max_steps", "forced"])
def test_each_reason_causes_exactly_one_refresh(case):
    # the decision after update k decides step k+1; the third decision (after step 3) is the scripted event
    overrides, stats, decisions, nan_at = [], [OK, OK], [], ()
    if case in BAD:
        stats.append(BAD[case])
    elif case.startswith("anchor"):
        decisions = ["accept", "accept", case.split("_")[1]]
    elif case == "max_steps":
        overrides = ["vp2o.trust_region.max_steps_per_refresh=3"]
    else:
        nan_at = (1,)  # the first batch has a non-finite advantage: its update is skipped, refresh forced
    sess = ScriptedSession(_cfg(*overrides), stats, decisions, nan_at)
    state, reasons, rows = _run(sess, 6)
    expected = {"drift_nan": "drift", "ess_nan": "ess", "anchor_reject": "anchor", "anchor_refresh": "anchor"}
    reason = expected.get(case, case)
    if case == "forced":
        assert reasons == ["start", "forced", "none", "none", "none", "none"]
        assert rows[0]["skipped"] and sess.updates == 5
    else:
        assert reasons == ["start", "none", "none", reason, "none", "none"]
        assert sess.updates == 6
    assert sess.rollouts == state.refreshes == 2
    assert rows[-1]["vp2o/refreshes"] == 2 and rows[-1]["rollout/samples"] == 2 * SAMPLES
    assert rows[-1]["rollout/tokens"] == 6 * SAMPLES
    assert set(reasons) <= set(REFRESH_REASONS)


def test_drift_buffer_keeps_learning_until_the_rule_fires_again():
    stats = [OK, BAD["drift"], OK, OK, OK, BAD["drift"], OK]
    sess = ScriptedSession(_cfg(), stats)
    state, reasons, rows = _run(sess, 8)
    assert reasons == ["start", "none", "drift", "none", "none", "none", "drift", "none"]
    assert [r["vp2o/drift"] for r in rows] == [s["drift"] for s in stats] + [OK["drift"]]
    assert sess.stat_calls == 8 and sess.updates == 8 and state.steps_since_refresh == 2


def test_anchor_failure_skips_the_statistics_pass():
    sess = ScriptedSession(_cfg(), decisions=["accept", "reject", "accept"])
    _, reasons, rows = _run(sess, 4)
    assert reasons == ["start", "none", "anchor", "none"]
    assert sess.stat_calls == 3 and "vp2o/drift" not in rows[1]  # no forward pass for a decided refresh


@pytest.mark.parametrize("overrides", [["rl.algo=grpo"], ["rl.refresh=every_step"],
                                       ["vp2o.trust_region.enabled=false"], ["vp2o.enabled=false"]])
def test_rule_off_refreshes_every_step(overrides):
    sess = ScriptedSession(_cfg(*overrides), decisions=["reject"] * 5)
    state, reasons, _ = _run(sess, 5)
    assert reasons == ["start"] + ["every_step"] * 4
    assert sess.stat_calls == 0 and sess.rollouts == 5 and state.samples == 5 * SAMPLES


def test_behaviour_budget_ablated_leaves_anchor_and_max_steps():
    sess = ScriptedSession(_cfg("rl.ablate.behaviour_budget=false", "vp2o.trust_region.max_steps_per_refresh=2"),
                           stats=[BAD["drift"]] * 9, decisions=["accept", "accept", "accept", "reject"])
    _, reasons, _ = _run(sess, 6)
    assert reasons == ["start", "none", "max_steps", "none", "anchor", "none"]
    assert sess.stat_calls == 0


def test_budget_is_spent_only_when_a_refresh_is_due():
    cfg = _cfg("rl.budget.samples=8")
    sess, state = ScriptedSession(cfg, stats=[OK, BAD["drift"], OK, BAD["drift"]]), LoopState()
    due = []
    for _ in range(4):
        rl_step(sess, state)
        due.append((state.samples, state.next_refresh, budget_spent(cfg, state)))
    # the run loop ends when a refresh is due and the budget is spent: after step 4, not after step 3
    assert due == [(4, None, False), (4, "drift", False), (8, None, True), (8, "drift", True)]


def _batch(rows, cols=5):
    r = torch.arange(rows, dtype=torch.float32)
    col = lambda: r[:, None].expand(rows, cols).clone()  # noqa: E731
    return RLBatch(col().long(), col().long(), col().long(), torch.zeros(rows, 1, cols, cols, dtype=torch.bool),
                   torch.ones(rows, cols), col(), r.clone())


def test_mini_batches_are_whole_groups_in_order():
    micro = [_batch(6), _batch(6)]
    micro[1].adv += 6
    minis = mini_batches(micro, 3, group=4)  # 12 sequences = 3 groups of 4 -> 3 mini-batches
    assert [[len(m) for m in mini] for mini in minis] == [[4], [4], [4]]
    assert torch.equal(torch.cat([m.adv for mini in minis for m in mini]), torch.arange(12.0))
    with pytest.raises(ValueError, match="mini_batches=2 must divide"):
        mini_batches(micro, 2, group=4)


@pytest.mark.parametrize("decision, failed", [("accept", False), ("backtrack", False), ("reject", True),
                                              ("refresh", True)])
def test_step_outcome_anchor_verdict_and_logged_row(decision, failed):
    raw = {"loss": 0.25, "decision": decision, "d_anc": 0.3, "d_anc_trace": [0.4, 0.3], "timing/stein": 0.1}
    out = StepOutcome.from_metrics(raw, "vp2o", decision=tr.DECISION_NAMES.index(decision))
    assert out.anchor_failed is failed and out.d_anc_trace == [0.4, 0.3] and not out.skipped
    assert out.logged() == {"loss": 0.25, "vp2o/decision": decision, "vp2o/d_anc": 0.3, "timing/stein": 0.1}
    skipped = StepOutcome.from_metrics({"loss": 1.0, "skipped": True, "skip_reason": "why"}, "learner")
    assert skipped.logged() == {"loss": 1.0, "skipped": True, "skip_reason": "why"} and not skipped.anchor_failed

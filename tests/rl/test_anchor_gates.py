"""Contract: the anchor budget judges a step by the routing the step produces (method §2.10): the
D_anc a VP2O step reports equals D_anc computed from a fresh forward of the post-step weights (its
gates and prototypes) against the anchors, not the pre-step forward's gates with post-step
prototypes (unless vp2o.trust_region.anchor_gates=pre_step asks for exactly that); each backtrack is judged again the same way, and a reject restores every weight.
One real tiny-recipe session on one rank."""

from __future__ import annotations

import pytest

from e2e.test_rl import QUICK
from harness import run_world
from megatron_vp2o.algo import trust_region as tr


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    overrides = QUICK + ["rl.micro_batch_size=8", "rl.lr=3e-3"]
    return run_world(1, "rl.worlds_anchor_gates:anchor_gates",
                     {"out": str(tmp_path_factory.mktemp("anchor")), "overrides": overrides}, timeout_s=300)


def test_d_anc_uses_the_post_step_gates(measured):
    got = measured["accept"]
    assert got["decision"] == tr.ACCEPT and len(got["trace"]) == 1
    assert got["fresh"] > 0
    assert got["trace"][0] == pytest.approx(got["fresh"], rel=1e-6, abs=1e-9)
    # the stale combination is measurably different here, so the check above can fail
    assert abs(got["stale"] - got["fresh"]) > 1e-3 * got["fresh"], got


def test_every_attempt_is_judged_and_a_reject_restores(measured):
    got = measured["reject"]
    assert got["decision"] == tr.REJECT and got["anchor_failed"]
    assert len(got["trace"]) == 1 + got["scales"]  # the full step and each backtrack
    assert all(d > 1e-9 for d in got["trace"])
    assert got["restored"]


def test_pre_step_gates_option_reuses_the_step_forward(measured):
    got = measured["pre_step"]
    assert len(got["trace"]) == 1
    assert got["trace"][0] == pytest.approx(got["stale"], rel=1e-6, abs=1e-9)
    assert abs(got["stale"] - got["fresh"]) > 1e-3 * got["fresh"], got


def test_anchor_on_the_first_micro_batches(measured):
    """vp2o.trust_region.anchor_micro_batches=1: the anchor and the post-step re-route see the first
    micro-batch's tokens only, and the reported D_anc is the reference on exactly those."""
    got = measured["subset"]
    assert got["micro_batches"] > 1 and got["tokens"] == got["first_tokens"] < got["all_tokens"]
    assert len(got["trace"]) >= 1 and got["fresh"] > 0
    assert got["trace"][-1] == pytest.approx(got["fresh"], rel=1e-6, abs=1e-9)

"""Contract (issue 19): the trust-region snapshot holds the main parameters and optimizer state only
(model parameters rebuilt as megatron does after a step); a rejected step restores every parameter
and optimizer tensor bitwise, and backtracking (no second copy: the post-step values wait in the
gradient buffer) gives the pre-step model at s=0 and the post-step model at s=1 bitwise; fp32 and
bf16, with and without the distributed optimizer, snapshot on the device and on the host."""

from __future__ import annotations

import pytest

from harness import run_world

from distributed.worlds_snapshot import COMBOS

WORLDS = {"1rank": 1, "dp2": 2}


@pytest.fixture(scope="module")
def worlds():
    return {name: run_world(n, "distributed.worlds_snapshot:combos", {}) for name, n in WORLDS.items()}


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{'distopt' if c[1] else 'nodistopt'}-{c[2]}")
@pytest.mark.parametrize("name", list(WORLDS))
def test_reject_restores_exactly_and_backtrack_rebuilds(worlds, name, combo):
    got = worlds[name]["results"][combo]
    assert worlds[name]["world"] == WORLDS[name]
    for key in ("learner_reject", "learner_exact", "step_changed", "backtrack_s0_is_before",
                "backtrack_s1_is_after", "backtrack_half_between", "restore_exact"):
        assert got[key], (key, got)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{'distopt' if c[1] else 'nodistopt'}-{c[2]}")
@pytest.mark.parametrize("name", list(WORLDS))
def test_snapshot_holds_main_params_and_optimizer_state_only(worlds, name, combo):
    got = worlds[name]["results"][combo]
    assert got["snapshot_bytes"] == got["expected_bytes"], got
    assert got["host_buffers"]  # CPU: host and device are the same memory
    assert got["snapshot_bytes"] <= got["old_snapshot_bytes"], got
    if combo[0] == "bf16" or (combo[1] and WORLDS[name] > 1):  # masters or 1/DP shards: no model copy
        assert got["snapshot_bytes"] < got["old_snapshot_bytes"], got


def test_print_snapshot_numbers(worlds):
    """Not a check: bytes per combination for the log (run with -s)."""
    for name, report in worlds.items():
        for combo, r in report["results"].items():
            print(f"{name} {combo}: snapshot {r['snapshot_bytes']} (before this change {r['old_snapshot_bytes']}), "
                  f"model params {r['model_param_bytes']}, exact {r['restore_exact']} learner {r['learner_exact']}")

"""Contract: with the megatron engine (engine log-probs = behaviour log-probs) rl.engine_is_cap=2 leaves a
run bit-identical to rl.engine_is_cap=null (same parameters and losses after a refresh and two updates, VP2O
and GRPO) and logs rollout/is_weight_mean = 1, rollout/is_capped_frac = 0; a fake engine mismatch in the
buffer (engine log-probs 0.5 below the behaviour ones on every token: w = e^0.5) changes the update and
is reported. Tiny recipe, one rank."""

from __future__ import annotations

import math

import pytest

from e2e.test_rl import QUICK
from harness import run_world


def _run(tmp_path_factory, name, overrides, shift=0.0):
    return run_world(1, "rl.worlds_engine_is:updates",
                     {"out": str(tmp_path_factory.mktemp(name)), "overrides": QUICK + overrides, "shift": shift},
                     timeout_s=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {"vp2o_off": _run(tmp_path_factory, "vp2o_off", []),
            "vp2o_on": _run(tmp_path_factory, "vp2o_on", ["rl.engine_is_cap=2"]),
            "grpo_off": _run(tmp_path_factory, "grpo_off", ["rl.algo=grpo"]),
            "grpo_on": _run(tmp_path_factory, "grpo_on", ["rl.algo=grpo", "rl.engine_is_cap=2"]),
            "vp2o_shift": _run(tmp_path_factory, "vp2o_shift", ["rl.engine_is_cap=2"], shift=0.5)}


@pytest.mark.parametrize("algo", ["vp2o", "grpo"])
def test_megatron_engine_cap_is_bit_identical(runs, algo):
    on, off = runs[f"{algo}_on"], runs[f"{algo}_off"]
    assert on["params"] == off["params"]
    assert [r["loss"] for r in on["rows"]] == [r["loss"] for r in off["rows"]]
    assert on["refresh"]["rollout/is_weight_mean"] == 1.0 and on["refresh"]["rollout/is_capped_frac"] == 0.0
    assert "rollout/is_weight_mean" not in off["refresh"]


def test_engine_mismatch_weights_the_update(runs):
    shifted = runs["vp2o_shift"]
    assert shifted["refresh"]["rollout/is_weight_mean"] == pytest.approx(math.exp(0.5), rel=1e-5)
    assert shifted["refresh"]["rollout/is_capped_frac"] == 0.0
    assert shifted["params"] != runs["vp2o_off"]["params"]

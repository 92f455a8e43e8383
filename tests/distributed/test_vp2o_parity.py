"""Contract: one VP2O step (Stein + repulsion + specialisation losses + trust region) from the same
weights gives the same parameters, prototypes and trust-region decision in every layout; the hook
equals `algo.stein.stein_transport` on the gathered full gradients; a forced violation restores
parameters and optimizer state exactly; with zero coefficients VP2O is plain megatron training."""

from __future__ import annotations

import pytest

from harness import run_world

from distributed.test_parity import LAYOUTS as FOUNDATION_LAYOUTS

# name -> (ranks, parallel section): the foundation's layouts, after the 1-rank run
LAYOUTS = {"1rank": (1, {}), **FOUNDATION_LAYOUTS}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp2o")
    init = str(root / "init")
    results, paths = {}, {}
    for name, (n, par) in LAYOUTS.items():  # "1rank" first: it writes the initial checkpoint
        paths[name] = str(root / name)
        results[name] = run_world(n, "distributed.worlds_vp2o:layout_step",
                                  {"init": init, "out": paths[name], "parallel": par,
                                   "reference": name == "1rank"})
    reference = results["1rank"]
    compared = run_world(1, "distributed.worlds_vp2o:compare", {"ref": paths["1rank"], "layouts": paths})
    return reference, results, compared


def test_zero_coefficients_is_plain_megatron_bitwise(worlds):
    assert worlds[0]["bitwise_plain"]


def test_reference_step_backtracks_then_accepts(worlds):
    ref = worlds[1]["1rank"]
    assert ref["decision"] == "backtrack" and ref["backtracks"] >= 1, ref["d_anc_trace"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(worlds, name):
    _, results, compared = worlds
    ref, got = results["1rank"], results[name]
    assert got["world"] == LAYOUTS[name][0]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert (got["decision"], got["backtracks"]) == (ref["decision"], ref["backtracks"])
    assert got["d_anc"] == pytest.approx(ref["d_anc"], abs=1e-5)
    assert compared[name]["max_param_diff"] < 1e-5, compared[name]
    assert compared[name]["proto_diff"] < 1e-5, compared[name]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hook_equals_stein_transport_on_gathered_grads(worlds, name):
    assert worlds[1][name]["hook_diff"] < 1e-7


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forced_violation_restores_exactly_on_every_rank(worlds, name):
    got = worlds[1][name]
    assert got["reject_decision"] == "reject"
    assert got["restore_exact"]


def test_print_parity_numbers(worlds):
    """Not a check: the per-layout numbers for the log (run with -s)."""
    _, results, compared = worlds
    for name in LAYOUTS:
        r, c = results[name], compared[name]
        print(f"{name}: param {c['max_param_diff']:.2e} proto {c['proto_diff']:.2e} hook {r['hook_diff']:.2e} "
              f"decision {r['decision']}x{r['backtracks']} d_anc {r['d_anc']:.6f}")


def test_vp2o_refuses_a_model_without_vp2o_layers(worlds):
    """Both megatron-core spec forms: every MoE layer of the VP2O build is a VP2O layer with the VP2O
    router, and init_vp2o refuses a model built with megatron's plain MoELayer, naming the fix."""
    refusal = worlds[2]["_refusal"]
    assert refusal["num_moe"] == refusal["num_vp2o"] == refusal["vp2o_routers"] >= 1, refusal
    assert refusal["message"] is not None and "0 VP2O MoE layers" in refusal["message"], refusal
    assert "rl.algo=grpo" in refusal["message"] and "MoELayer" in refusal["message"], refusal

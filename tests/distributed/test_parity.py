"""Contract: one optimizer step of the tiny MoE GPT from the same full weights gives the same parameters
(fp32 allclose) in every parallel layout we claim, and checkpoints reshard across layouts."""

from __future__ import annotations

import pytest
import torch

from harness import run_world

# name -> (ranks, parallel section)
LAYOUTS = {
    "dp2": (2, {}),
    "ep2": (2, {"ep": 2}),
    "ep4": (4, {"ep": 4}),
    "dp2xep2": (4, {"ep": 2}),
    "tp2_sp": (2, {"tp": 2}),
    "pp2": (2, {"pp": 2}),
    "tp2xep2": (4, {"tp": 2, "ep": 2, "etp": 1}),
    "dp2_nodistopt_overlap": (2, {"distributed_optimizer": False, "overlap_grad_reduce": True}),
}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    init, ref = str(root / "init"), str(root / "ref")
    reference = run_world(1, "distributed.worlds_foundation:reference", {"init": init, "ref": ref})
    results, paths = {}, {}
    for name, (n, par) in LAYOUTS.items():
        paths[name] = str(root / name)
        results[name] = run_world(n, "distributed.worlds_foundation:layout_step",
                                  {"init": init, "out": paths[name], "parallel": par})
    compared = run_world(1, "distributed.worlds_foundation:compare", {"ref": ref, "layouts": paths})
    return reference, results, compared


def test_reference_step_changes_weights_and_is_bitwise_repeatable(parity):
    reference, _, _ = parity
    assert reference["changed"]
    assert reference["bitwise_repeat"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(parity, name):
    reference, results, compared = parity
    assert results[name]["world"] == LAYOUTS[name][0]
    assert results[name]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert results[name]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
    assert compared[name]["max_param_diff"] < 1e-5, compared[name]


@pytest.mark.parametrize("name", ["ep2", "ep4", "tp2_sp", "tp2xep2"])
def test_checkpoint_reshards_to_one_rank_with_same_logits(parity, name):
    _, results, compared = parity
    assert torch.allclose(results[name]["logits"], compared[name]["logits_ep1"], atol=1e-5, rtol=0)

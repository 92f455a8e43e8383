"""Contract: VP2O counts response tokens only (method §2.5, 2.9, 2.10): adding tokens that are not
response tokens to an RL batch (left padding; a sequence with no response token) leaves the
co-activation counts, the active set, both specialisation losses, D_anc and the Stein-transported
gradients unchanged (megatron's load-balancing loss included: the layer passes the mask to the
router as its padding mask). One real tiny-recipe session (ortho on, cosine form) on one rank."""

from __future__ import annotations

import pytest
import torch

from e2e.test_rl import QUICK
from harness import run_world


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    overrides = QUICK + ["vp2o.specialization.ortho_coef=0.01", "vp2o.specialization.ortho_form=cosine",
                         "vp2o.specialization.var_coef=0.01", "rl.micro_batch_size=8", "rl.lr=3e-3"]
    return run_world(1, "rl.worlds_response_mask:response_mask",
                     {"out": str(tmp_path_factory.mktemp("mask")), "overrides": overrides}, timeout_s=300)


def test_counts_cover_exactly_the_response_tokens(measured):
    plain = measured["plain"]
    assert measured["response_tokens"] < measured["all_tokens"]  # the batch has prompt and pad tokens
    assert plain["routed"] == measured["response_tokens"]
    for counts_EE in plain["counts"]:
        assert counts_EE.diagonal().sum().item() == measured["top_k"] * measured["response_tokens"]
    assert plain["d_anc"].item() > 0


@pytest.mark.parametrize("variant", ["left_pad", "prompt_row"])
def test_extra_tokens_change_nothing(measured, variant):
    plain, other = measured["plain"], measured[variant]
    assert other["routed"] == plain["routed"]
    assert all(torch.equal(a, b) for a, b in zip(plain["counts"], other["counts"]))
    assert all(torch.equal(a, b) for a, b in zip(plain["active"], other["active"]))
    assert torch.allclose(plain["loss"], other["loss"], rtol=1e-5, atol=1e-7)
    for a, b in zip(plain["spec_losses"], other["spec_losses"]):  # ortho, var, entropy sum, tokens
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(plain["d_anc"], other["d_anc"], rtol=1e-5, atol=1e-8)
    for a, b in zip(plain["grads"], other["grads"]):  # summation order differs with padding: tolerance
        # relative to the gradient's own scale (the median-bandwidth kernel mixes neighbours' gradients)
        scale = float(a.abs().max())
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale), float((a - b).abs().max()) / scale

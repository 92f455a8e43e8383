"""Contract: the prototype kernel matches its formula (method §2.6); co-activation counts, C, the
neighbour masks and the active set match per-token / per-expert loop references (method §2.5, 2.7)."""

import math

import pytest
import torch

from megatron_vp2o.algo import coactivation as C
from megatron_vp2o.algo import kernels
from megatron_vp2o.algo.prototypes import normalize


def _routing(num_tokens, num_experts, top_k):
    scores_TE = torch.rand(num_tokens, num_experts)
    return torch.topk(scores_TE, top_k, dim=-1).indices


@pytest.mark.parametrize("form", ["sq_cos", "cos"])
def test_kernel_matches_pairwise_formula(form):
    protos_ED = normalize(torch.randn(6, 10, dtype=torch.float64))
    kernel_EE = kernels.prototype_kernel(protos_ED, tau0=0.7, form=form)
    tau = 0.7 / math.log(7)
    for i in range(6):
        for j in range(6):
            c = float(protos_ED[i] @ protos_ED[j])
            gap = 1 - c * c if form == "sq_cos" else 1 - c
            expected = math.exp(-gap / tau)
            assert kernel_EE[i, j].item() == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(torch.diagonal(kernel_EE), torch.ones(6, dtype=torch.float64))


def test_sq_cos_is_sign_invariant_and_cos_is_not():
    protos_ED = normalize(torch.randn(5, 8, dtype=torch.float64))
    flipped_ED = protos_ED * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)[:, None]
    sq = [kernels.prototype_kernel(p, 1.0, "sq_cos") for p in (protos_ED, flipped_ED)]
    cos = [kernels.prototype_kernel(p, 1.0, "cos") for p in (protos_ED, flipped_ED)]
    assert torch.allclose(sq[0], sq[1], atol=1e-15)
    assert not torch.allclose(cos[0], cos[1])


def test_kernel_derivative_matches_autograd():
    cos_N = torch.linspace(-0.99, 0.99, 11, dtype=torch.float64, requires_grad=True)
    for name in kernels.KERNELS:
        form = kernels.KERNELS.get(name)
        (grad_N,) = torch.autograd.grad(form.value(cos_N, 0.3).sum(), cos_N)
        assert torch.allclose(form.dvalue(cos_N, 0.3), grad_N, rtol=1e-12)


def test_unknown_kernel_lists_choices():
    with pytest.raises(ValueError, match="unknown kernel 'rbf'; choices: cos, sq_cos"):
        kernels.prototype_kernel(torch.eye(3), 1.0, form="rbf")


def test_counts_match_one_hot_reference_and_sum_over_micro_batches():
    topk_TK = _routing(50, 8, 3)
    mask_T = torch.rand(50) > 0.3
    one_hot_TE = torch.zeros(50, 8).scatter_(1, topk_TK, 1.0) * mask_T[:, None]
    counts_EE = C.coactivation_counts(topk_TK, 8, mask_T)
    assert torch.equal(counts_EE, one_hot_TE.T @ one_hot_TE)
    assert torch.equal(C.tokens_per_expert(counts_EE), one_hot_TE.sum(0))
    halves = [C.coactivation_counts(t, 8, m) for t, m in zip(topk_TK.chunk(2), mask_T.chunk(2))]
    assert torch.equal(halves[0] + halves[1], counts_EE)


def test_coactivation_matrix_normalises_and_zeroes_diagonal():
    topk_TK = _routing(40, 6, 2)
    counts_EE = C.coactivation_counts(topk_TK, 6)
    coact_EE = C.coactivation_matrix(counts_EE, torch.tensor(40.0))
    assert torch.equal(torch.diagonal(coact_EE), torch.zeros(6))
    off_EE = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(coact_EE[off_EE], counts_EE[off_EE] / 40)
    assert torch.allclose(coact_EE, coact_EE.T)


@pytest.mark.parametrize("topm", [0, 1, 2, 5, 20])
def test_neighbour_masks_match_loop_reference(topm):
    num_experts = 7
    coact_EE = torch.rand(num_experts, num_experts)
    coact_EE = torch.where(torch.rand(num_experts, num_experts) < 0.4, 0.0, coact_EE)
    coact_EE.fill_diagonal_(0.0)
    coactive_EE, inactive_EE = C.neighbour_masks(coact_EE, topm)
    for i in range(num_experts):
        others = sorted((j for j in range(num_experts) if j != i), key=lambda j: -coact_EE[i, j])
        expected = {j for j in others[:topm] if coact_EE[i, j] > 0}
        assert set(torch.nonzero(coactive_EE[i]).flatten().tolist()) == expected
        assert set(torch.nonzero(inactive_EE[i]).flatten().tolist()) == set(others) - expected


def test_active_experts_from_counts_or_tokens():
    topk_TK = torch.tensor([[0, 2], [2, 3], [0, 3]])
    mask_T = torch.tensor([True, True, False])
    counts_EE = C.coactivation_counts(topk_TK, 5, mask_T)
    expected_E = torch.tensor([True, False, True, True, False])
    assert torch.equal(C.active_experts(counts_EE), expected_E)
    assert torch.equal(C.active_experts(torch.tensor([1, 0, 2, 1, 0])), expected_E)

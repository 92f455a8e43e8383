"""Contract: per-layer diagnostics (method §2.13) take their analytic values on uniform, one-hot,
orthogonal and collapsed inputs, and ignore masked tokens."""

import math

import pytest
import torch

from megatron_vp2o.algo import diagnostics as dg
from megatron_vp2o.algo.prototypes import normalize


def test_router_entropy_analytic_values_and_mask():
    uniform_TE = torch.full((5, 8), 1 / 8, dtype=torch.float64)
    assert dg.router_entropy(uniform_TE).item() == pytest.approx(math.log(8))
    one_hot_TE = torch.eye(8, dtype=torch.float64)[:5]
    assert dg.router_entropy(one_hot_TE) == 0
    mixed_TE = torch.cat([uniform_TE, one_hot_TE])
    mask_T = torch.tensor([True] * 5 + [False] * 5)
    assert torch.allclose(dg.router_entropy(mixed_TE, mask_T), dg.router_entropy(uniform_TE))
    assert torch.allclose(dg.router_entropy(mixed_TE, mask_T, normalizer=10),
                          dg.router_entropy(mixed_TE))


def test_utilisation():
    stats = dg.utilisation(torch.tensor([4, 0, 2, 2]))
    assert torch.allclose(stats["share"], torch.tensor([0.5, 0.0, 0.25, 0.25]))
    assert stats["load_factor"] == 2.0 and stats["dead_experts"] == 1
    assert dg.utilisation(torch.ones(6))["load_factor"] == 1.0


def test_overlaps_and_kernel_mass():
    orthonormal_ED = torch.eye(6, dtype=torch.float64)[:4]
    assert dg.prototype_overlap(orthonormal_ED) == 0
    same_ED = normalize(torch.randn(1, 6, dtype=torch.float64)).expand(4, 6)
    assert torch.allclose(dg.prototype_overlap(-same_ED), torch.tensor(1.0, dtype=torch.float64))
    matrix_EE = torch.rand(5, 5)
    off = matrix_EE[~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(dg.kernel_mass(matrix_EE), off.mean())
    assert torch.allclose(dg.coactivation_overlap(matrix_EE), off.mean())


def test_transport_norms():
    grads_EP, attracted_EP, rep_EP = torch.randn(3, 4, 5)
    norms = dg.transport_norms(grads_EP, attracted_EP, rep_EP, 0.1)
    assert torch.allclose(norms["grad_norm"], grads_EP.flatten().norm())
    shift = (attracted_EP - grads_EP).flatten().norm()
    assert torch.allclose(norms["attraction_shift_norm"], shift)
    assert torch.allclose(norms["repulsion_norm"], 0.1 * rep_EP.flatten().norm())


def test_coactivation_cosine_analytic_values():
    from megatron_vp2o.algo.coactivation import coactivation_counts

    # locked pairs: experts (0,1) and (2,3) always together -> cosine 1 for those pairs, 0 elsewhere
    idx_TK = torch.tensor([[0, 1], [2, 3]] * 50)
    counts = coactivation_counts(idx_TK, 4, dtype=torch.float64)
    assert dg.coactivation_cosine(counts).item() == pytest.approx(2 * 2 / 12)
    # independent uniform top-2 of 8: (K-1)/(E-1) = 1/7 in expectation, whatever mean C_ij says
    gen = torch.Generator().manual_seed(0)
    idx_TK = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(20000)])
    counts = coactivation_counts(idx_TK, 8, dtype=torch.float64)
    assert dg.coactivation_cosine(counts).item() == pytest.approx(1 / 7, rel=0.02)
    c_EE = counts / 20000 * (1 - torch.eye(8, dtype=torch.float64))  # C = counts / T
    assert dg.coactivation_overlap(c_EE).item() == pytest.approx(2 / 56, rel=1e-9)  # K(K-1)/(E(E-1)): fixed

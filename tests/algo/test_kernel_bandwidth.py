"""Contract: the median-heuristic bandwidth and the sharpness (algo/kernels.py) take their analytic
values; the closed-form repulsion still equals autograd under them (with h held fixed); the
diagnostics (kernel spread, expert shares, relative change) take their analytic values."""

import math

import pytest
import torch

from megatron_vp2o.algo import diagnostics as dg
from megatron_vp2o.algo import kernels, stein
from megatron_vp2o.algo.config import SteinConfig
from megatron_vp2o.algo.prototypes import init_prototypes, normalize

# e1, e2 and their bisector: c12 = 0, c13 = c23 = 1/sqrt(2); sq_cos distances d12 = 1, d13 = d23 = 1/2
PROTOS = normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]], dtype=torch.float64))


def test_off_diagonal_and_median():
    m = torch.arange(16.0).view(4, 4)
    assert kernels.off_diagonal(m).tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14]
    assert kernels.median_off_diagonal(m).item() == 7.5
    assert kernels.median_off_diagonal(torch.stack([m, 2 * m])).tolist() == [7.5, 15.0]


def test_median_bandwidth_analytic():
    # off-diagonal d: 1, 1, .5, .5, .5, .5 -> median .5; h = .5 / log 4
    assert kernels.median_bandwidth(PROTOS).item() == pytest.approx(0.5 / math.log(4), rel=1e-12)
    # cos form: d = 1 - c: 1, 1, 1 - 1/sqrt2 (x4) -> median 1 - 1/sqrt2
    assert kernels.median_bandwidth(PROTOS, "cos").item() == pytest.approx(
        (1 - 2 ** -0.5) / math.log(4), rel=1e-12)


def test_median_kernel_gives_the_median_pair_one_over_e_plus_one_and_sharpness_powers_it():
    k = kernels.prototype_kernel(PROTOS, 1.0, "sq_cos", "median")
    assert k[0, 2].item() == pytest.approx(1 / 4) and k[1, 2].item() == pytest.approx(1 / 4)
    assert k[0, 1].item() == pytest.approx(1 / 16)
    assert torch.allclose(torch.diagonal(k), torch.ones(3, dtype=torch.float64))
    k2 = kernels.prototype_kernel(PROTOS, 1.0, "sq_cos", "median", sharpness=2.0)
    assert torch.allclose(k2, k ** 2)
    # the median rule is scale-free in the geometry: rotating the prototypes changes nothing
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert torch.allclose(kernels.prototype_kernel(PROTOS @ q, 1.0, "sq_cos", "median"), k)


def test_fixed_bandwidth_is_todays_kernel_and_sharpness_divides_tau():
    protos = normalize(torch.randn(6, 10, dtype=torch.float64))
    today = kernels.prototype_kernel(protos, 0.7, "sq_cos")
    assert torch.equal(kernels.prototype_kernel(protos, 0.7, "sq_cos", "fixed", 1.0), today)
    assert torch.allclose(kernels.prototype_kernel(protos, 0.7, "sq_cos", "fixed", 3.0), today ** 3)
    assert kernels.kernel_tau(protos, 0.7) == pytest.approx(0.7 / math.log(7))
    with pytest.raises(ValueError, match="unknown kernel bandwidth 'mean'"):
        kernels.kernel_tau(protos, 0.7, bandwidth="mean")


def test_median_kernel_per_layer():
    layers = torch.stack([PROTOS, normalize(torch.randn(3, 3, dtype=torch.float64))])
    batched = kernels.prototype_kernel(layers, 1.0, "sq_cos", "median")
    for i in range(2):
        assert torch.allclose(batched[i], kernels.prototype_kernel(layers[i], 1.0, "sq_cos", "median"))


def _energy(weight_EDF, protos_ED, inactive_EE, tau):
    value = kernels.KERNELS.get("sq_cos").value
    total = weight_EDF.new_zeros(())
    for i in range(protos_ED.shape[0]):
        z_D = weight_EDF[i] @ (weight_EDF[i].T @ protos_ED[i])
        v_E = inactive_EE[i].to(weight_EDF.dtype) / inactive_EE[i].sum().clamp_min(1)
        total = total + (v_E * value(protos_ED @ (z_D / z_D.norm()), tau)).sum()
    return total


@pytest.mark.parametrize("sharpness", [1.0, 4.0])
def test_repulsion_under_median_bandwidth_equals_autograd(sharpness):
    weight_EDF = torch.randn(5, 9, 6, dtype=torch.float64)
    protos_ED = init_prototypes(weight_EDF, steps=3)
    inactive_EE = ~torch.eye(5, dtype=torch.bool)
    inactive_EE[0, 1] = inactive_EE[2, 3] = False
    tau = (kernels.median_bandwidth(protos_ED) / sharpness).item()
    weight_EDF.requires_grad_(True)
    (expected,) = torch.autograd.grad(_energy(weight_EDF, protos_ED, inactive_EE, tau), weight_EDF)
    got = stein.repulsion_grad(weight_EDF.detach(), protos_ED, inactive_EE, 1.0, "sq_cos", 0, "median",
                               sharpness)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-13)


def test_config_fields_and_kernel_args():
    cfg = SteinConfig()
    assert (cfg.kernel_bandwidth, cfg.kernel_sharpness) == ("median", 1.0)
    assert cfg.kernel_args() == {"tau0": 1.0, "form": "sq_cos", "bandwidth": "median", "sharpness": 1.0}
    with pytest.raises(ValueError, match=r"stein\.kernel_bandwidth must be one of \{fixed, median\}"):
        SteinConfig(kernel_bandwidth="mean")
    with pytest.raises(ValueError, match=r"stein\.kernel_sharpness must be > 0"):
        SteinConfig(kernel_sharpness=0)


def test_kernel_spread_analytic():
    fixed = kernels.prototype_kernel(PROTOS, 1.0)  # tau = 1/log 4: k12 = 1/4, k13 = k23 = 1/2
    spread = dg.kernel_spread(fixed)
    assert [spread[k].item() for k in ("min", "median", "max")] == pytest.approx([0.25, 0.5, 0.5])
    spread = dg.kernel_spread(kernels.prototype_kernel(PROTOS, 1.0, "sq_cos", "median"))
    assert [spread[k].item() for k in ("min", "median", "max")] == pytest.approx([1 / 16, 1 / 4, 1 / 4])


def test_expert_shares_analytic():
    active = torch.tensor([True, True, True, False])
    coactive = torch.zeros(4, 4, dtype=torch.bool)
    coactive[0, 1] = coactive[1, 0] = True
    inactive = ~coactive & ~torch.eye(4, dtype=torch.bool)
    shares = dg.expert_shares(active, coactive, inactive)
    # experts 0 and 1 have 1 of 3 others co-active, expert 2 none: mean (1/3 + 1/3 + 0) / 3
    assert shares["active"].item() == 0.75
    assert shares["coactive"].item() == pytest.approx(2 / 9)
    assert shares["inactive"].item() == pytest.approx(7 / 9)


def test_relative_change_analytic():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ||g|| = 5
    a = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # attraction shift norm 1
    r = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    out = dg.relative_change(g, a, r, 0.5)  # alpha R = [[0, 0], [1, 0]]: norm 1
    assert out["attraction"].item() == pytest.approx(0.2) and out["repulsion"].item() == pytest.approx(0.2)
    assert out["total"].item() == pytest.approx(math.sqrt(2) / 5)
    assert set(dg.relative_change(g, g)) == {"attraction", "total"} and dg.relative_change(g, g)["total"] == 0


def test_ratio_quantiles_analytic():
    ratios = torch.tensor([[1.0, 2.0, 4.0, 100.0], [0.5, 1.5, 3.0, 8.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    q = dg.ratio_quantiles(ratios.log(), torch.zeros(2, 4), mask)
    # valid sorted: .5 1 1.5 2 3 4 8 (n = 7): p50 = rank 4 = 2, p99 = rank 7 = 8, max = 8 (100 masked)
    assert [q[k].item() for k in ("p50", "p99", "max")] == pytest.approx([2.0, 8.0, 8.0])
    none = dg.ratio_quantiles(ratios.log(), torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    assert none["max"].item() == 1.0

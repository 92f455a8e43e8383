"""Contract: sparse attraction equals its dense definition, the closed-form repulsion equals
autograd through one power step (and gradcheck), the transport reduces to identity and to
textbook SVGD, which reaches a Gaussian target (method §2.8)."""

import pytest
import torch

from megatron_vp2o.algo import kernels, stein
from megatron_vp2o.algo.coactivation import neighbour_masks
from megatron_vp2o.algo.prototypes import init_prototypes, normalize


def _layer(num_experts=8, topm=3, dtype=torch.float64):
    protos_ED = normalize(torch.randn(num_experts, 12, dtype=dtype))
    kernel_EE = kernels.prototype_kernel(protos_ED, tau0=1.0)
    coact_EE = torch.rand(num_experts, num_experts, dtype=dtype)
    coact_EE = torch.where(torch.rand(num_experts, num_experts) < 0.3, 0.0, coact_EE)
    coactive_EE, inactive_EE = neighbour_masks(coact_EE, topm)
    return protos_ED, kernel_EE, coactive_EE, inactive_EE


def _dense_attraction(grads_EP, kernel_EE, coactive_EE):
    mbar_EE = coactive_EE.to(kernel_EE.dtype) + torch.eye(kernel_EE.shape[0], dtype=kernel_EE.dtype)
    w_EE = mbar_EE * kernel_EE
    return (w_EE / w_EE.sum(-1, keepdim=True)) @ grads_EP


@pytest.mark.parametrize("topm", [0, 1, 3, 7, 10])
def test_attraction_weights_are_row_stochastic_with_self(topm):
    _, kernel_EE, coactive_EE, _ = _layer(topm=topm)
    idx_EM1, w_EM1 = stein.attraction_weights(kernel_EE, coactive_EE, topm)
    assert idx_EM1.shape == w_EM1.shape == (8, min(topm, 7) + 1)
    assert torch.allclose(w_EM1.sum(-1), torch.ones(8, dtype=torch.float64))
    assert torch.equal(idx_EM1[:, 0], torch.arange(8)) and (w_EM1[:, 0] > 0).all()
    padded_EM = w_EM1[:, 1:] == 0
    self_EM = torch.arange(8)[:, None].expand(-1, w_EM1.shape[1] - 1)
    assert torch.equal(idx_EM1[:, 1:][padded_EM], self_EM[padded_EM])
    assert torch.equal((~padded_EM).sum(-1), coactive_EE.sum(-1))


@pytest.mark.parametrize("topm", [1, 3, 7])
def test_sparse_attraction_equals_dense_reference(topm):
    _, kernel_EE, coactive_EE, _ = _layer(topm=topm)
    grads_EP = torch.randn(8, 30, dtype=torch.float64)
    expected_EP = _dense_attraction(grads_EP, kernel_EE, coactive_EE)
    assert torch.allclose(stein.attraction(grads_EP, kernel_EE, coactive_EE, topm), expected_EP)
    assert torch.allclose(stein.attraction(grads_EP, kernel_EE, coactive_EE), expected_EP)
    idx_EM1, w_EM1 = stein.attraction_weights(kernel_EE, coactive_EE, topm)
    assert torch.allclose(stein.mix_gathered(grads_EP[idx_EM1], w_EM1), expected_EP)


def test_gather_mix_for_a_subset_of_rows():
    # Expert parallel: local rows 4..7 mix rows of the full (exchanged) gradient table.
    _, kernel_EE, coactive_EE, _ = _layer(topm=3)
    grads_EP = torch.randn(8, 11, dtype=torch.float64)
    idx_EM1, w_EM1 = stein.attraction_weights(kernel_EE, coactive_EE, 3)
    local_XP = stein.gather_mix(grads_EP, idx_EM1[4:], w_EM1[4:])
    assert torch.allclose(local_XP, _dense_attraction(grads_EP, kernel_EE, coactive_EE)[4:])


def test_attraction_batched_over_layers():
    layers = [_layer(topm=2) for _ in range(3)]
    grads_LEP = torch.randn(3, 8, 5, dtype=torch.float64)
    kernel_LEE = torch.stack([k for _, k, _, _ in layers])
    coactive_LEE = torch.stack([c for _, _, c, _ in layers])
    out_LEP = stein.attraction(grads_LEP, kernel_LEE, coactive_LEE, topm=2)
    for layer in range(3):
        expected_EP = _dense_attraction(grads_LEP[layer], kernel_LEE[layer], coactive_LEE[layer])
        assert torch.allclose(out_LEP[layer], expected_EP)


def test_no_repulsion_and_no_neighbours_is_identity():
    _, kernel_EE, _, inactive_EE = _layer(topm=0)
    coactive_EE, _ = neighbour_masks(torch.rand(8, 8), 0)
    grads_EP = torch.randn(8, 20, dtype=torch.float64)
    active_E = torch.ones(8, dtype=torch.bool)
    out_EP = stein.stein_transport(grads_EP, kernel_EE, coactive_EE, active_E, topm=0,
                                   repulsion_EP=torch.randn(8, 20, dtype=torch.float64),
                                   repulsion_coef=0.0)
    assert torch.equal(out_EP, grads_EP)


def test_transport_combines_attraction_repulsion_and_active_set():
    _, kernel_EE, coactive_EE, _ = _layer(topm=3)
    grads_EP, rep_EP = torch.randn(2, 8, 20, dtype=torch.float64)
    active_E = torch.tensor([True] * 6 + [False] * 2)
    out_EP = stein.stein_transport(grads_EP, kernel_EE, coactive_EE, active_E, topm=3,
                                   repulsion_EP=rep_EP, repulsion_coef=0.05)
    expected_EP = _dense_attraction(grads_EP, kernel_EE, coactive_EE) + 0.05 * rep_EP
    assert torch.allclose(out_EP[:6], expected_EP[:6])
    assert torch.equal(out_EP[6:], torch.zeros(2, 20, dtype=torch.float64))
    kept_EP = stein.keep_inactive(out_EP, grads_EP, active_E)
    assert torch.equal(kept_EP[6:], grads_EP[6:]) and torch.equal(kept_EP[:6], out_EP[:6])


def _repulsion_energy_reference(weight_EDF, protos_ED, inactive_EE, tau0, form):
    """sum_i R_i with u_i(W_i) = normalize(W_i W_i^T u_i) (differentiable), loop over experts."""
    num_experts = protos_ED.shape[0]
    tau = kernels.kernel_temperature(num_experts, tau0)
    value = kernels.KERNELS.get(form).value
    total = weight_EDF.new_zeros(())
    for i in range(num_experts):
        z_D = weight_EDF[i] @ (weight_EDF[i].T @ protos_ED[i])
        u_D = z_D / z_D.norm()
        v_E = inactive_EE[i].to(weight_EDF.dtype) / inactive_EE[i].sum().clamp_min(1)
        total = total + (v_E * value(protos_ED @ u_D, tau)).sum()
    return total


@pytest.mark.parametrize("form", ["sq_cos", "cos"])
def test_repulsion_grad_equals_autograd_through_one_power_step(form):
    weight_EDF = torch.randn(6, 10, 7, dtype=torch.float64)
    protos_ED = init_prototypes(weight_EDF, steps=3)  # not converged: u(W) != u
    _, _, _, inactive_EE = _layer(6, topm=2)
    weight_EDF.requires_grad_(True)
    energy = _repulsion_energy_reference(weight_EDF, protos_ED, inactive_EE, 0.5, form)
    (expected_EDF,) = torch.autograd.grad(energy, weight_EDF)
    got_EDF = stein.repulsion_grad(weight_EDF.detach(), protos_ED, inactive_EE, 0.5, form)
    assert got_EDF.abs().max() > 1e-3
    assert torch.allclose(got_EDF, expected_EDF, rtol=1e-10, atol=1e-13)


class _ClosedFormEnergy(torch.autograd.Function):
    """Energy forward by the reference, backward by the closed form under test."""

    @staticmethod
    def forward(ctx, weight_EDF, protos_ED, inactive_EE):
        ctx.save_for_backward(weight_EDF, protos_ED, inactive_EE)
        return _repulsion_energy_reference(weight_EDF, protos_ED, inactive_EE, 0.8, "sq_cos")

    @staticmethod
    def backward(ctx, grad_out):
        weight_EDF, protos_ED, inactive_EE = ctx.saved_tensors
        grad_EDF = stein.repulsion_grad(weight_EDF, protos_ED, inactive_EE, 0.8, "sq_cos")
        return grad_out * grad_EDF, None, None


def test_repulsion_grad_passes_gradcheck():
    weight_EDF = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    protos_ED = init_prototypes(weight_EDF.detach(), steps=2)
    _, _, _, inactive_EE = _layer(4, topm=1)
    assert torch.autograd.gradcheck(_ClosedFormEnergy.apply, (weight_EDF, protos_ED, inactive_EE))


def test_repulsion_split_over_expert_and_tensor_parallel_ranks():
    weight_EDF = torch.randn(8, 10, 12, dtype=torch.float64)
    protos_ED = init_prototypes(weight_EDF, steps=2)
    _, _, _, inactive_EE = _layer(8, topm=2)
    full_EDF = stein.repulsion_grad(weight_EDF, protos_ED, inactive_EE, 1.0)
    # Expert parallel: the rank holding experts 4..7 sees all prototypes but only its rows.
    local_EDF = stein.repulsion_grad(weight_EDF[4:], protos_ED, inactive_EE[4:], 1.0, "sq_cos", 4)
    assert torch.allclose(local_EDF, full_EDF[4:])
    # Expert TP: z is summed over F shards, everything else is shard-local.
    shards = weight_EDF.chunk(3, dim=-1)
    from megatron_vp2o.algo.prototypes import power_step_partial
    z_ED = sum(power_step_partial(w, protos_ED) for w in shards)
    parts = [stein.repulsion_grad_from_z(w, protos_ED, z_ED, inactive_EE, 1.0) for w in shards]
    assert torch.allclose(torch.cat(parts, dim=-1), full_EDF)


def test_svgd_reaches_gaussian_target():
    mean_P = torch.tensor([1.0, -2.0])
    cov_PP = torch.tensor([[2.0, 0.8], [0.8, 1.0]])
    precision_PP = torch.linalg.inv(cov_PP)
    particles_NP = torch.randn(256, 2)
    for _ in range(400):
        score_NP = -(particles_NP - mean_P) @ precision_PP
        particles_NP = particles_NP + 2.0 * stein.svgd_direction(particles_NP, score_NP)
    assert ((particles_NP.mean(0) - mean_P).abs() < 0.05 * mean_P.abs()).all()
    assert ((torch.cov(particles_NP.T) - cov_PP).abs() < 0.05 * cov_PP.abs()).all()


def test_svgd_single_particle_is_gradient_ascent_and_matches_mix():
    x_1P, score_1P = torch.randn(2, 1, 3, dtype=torch.float64)
    assert torch.allclose(stein.svgd_direction(x_1P, score_1P), score_1P)
    # All-ones masks with 1/n weights: the driving term is the attraction mix of the scores.
    x_NP, score_NP = torch.randn(2, 6, 3, dtype=torch.float64)
    k_NN, h = stein.rbf_kernel(x_NP, bandwidth=0.7)
    idx_NN = torch.arange(6).expand(6, 6)
    drive_NP = stein.mix_gathered(score_NP[idx_NN], k_NN / 6)
    repulse_NP = (2 / 0.7) * (k_NN[..., None] * (x_NP[:, None] - x_NP[None])).sum(1) / 6
    assert torch.allclose(stein.svgd_direction(x_NP, score_NP, 0.7), drive_NP + repulse_NP)


def test_rank_two_factors_multiply_to_the_repulsion_and_give_its_norm():
    gen = torch.Generator().manual_seed(5)
    weight_EDF = torch.randn(6, 8, 5, generator=gen, dtype=torch.float64)
    protos_ED = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    inactive_EE = torch.rand(6, 6, generator=gen) > 0.5
    z_ED = stein.power_step_partial(weight_EDF, protos_ED)
    left, right = stein.repulsion_factors_from_z(weight_EDF, protos_ED, z_ED, inactive_EE, 1.0)
    full = stein.repulsion_grad_from_z(weight_EDF, protos_ED, z_ED, inactive_EE, 1.0)
    assert torch.allclose(left @ right, full) and left.shape == (6, 8, 2) and right.shape == (6, 2, 5)
    assert torch.allclose(stein.rank_two_norm(left, right), torch.linalg.vector_norm(full))

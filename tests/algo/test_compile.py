"""Contract: every public tensor function of megatron_vp2o.algo traces into one graph under
torch.compile(fullgraph=True, backend="eager") (the CPU proxy for CUDA-graph capture: no host
syncs, no data-dependent Python control flow) and the compiled result equals eager."""

import inspect

import pytest
import torch

from megatron_vp2o.algo import coactivation, diagnostics, grpo, kernels, prototypes, specialization
from megatron_vp2o.algo import stein
from megatron_vp2o.algo import trust_region

E, D, F, T, K, P, B, L = 6, 8, 5, 10, 2, 7, 4, 3
MODULES = (coactivation, diagnostics, grpo, kernels, prototypes, specialization, stein,
           trust_region)
# Helpers that take or return only Python scalars: nothing to capture.
NOT_TENSOR_FUNCTIONS = {"kernel_temperature", "backtrack_scales"}


def _inputs():
    g = torch.Generator().manual_seed(0)
    protos_ED = prototypes.normalize(torch.randn(E, D, generator=g))
    topk_TK = torch.topk(torch.rand(T, E, generator=g), K, dim=-1).indices
    mask_T = torch.rand(T, generator=g) > 0.2
    counts_EE = coactivation.coactivation_counts(topk_TK, E, mask_T)
    coact_EE = coactivation.coactivation_matrix(counts_EE, mask_T.sum())
    coactive_EE, inactive_EE = coactivation.neighbour_masks(coact_EE, K)
    kernel_EE = kernels.prototype_kernel(protos_ED, 1.0)
    idx_EM1, w_EM1 = stein.attraction_weights(kernel_EE, coactive_EE, K)
    return dict(
        weight=torch.randn(E, D, F, generator=g), protos=protos_ED, topk=topk_TK, mask=mask_T,
        counts=counts_EE, coact=coact_EE, coactive=coactive_EE, inactive=inactive_EE,
        kernel=kernel_EE, idx=idx_EM1, w=w_EM1, grads=torch.randn(E, P, generator=g),
        gates=torch.rand(T, K, generator=g), out=torch.randn(T, K, D, generator=g),
        probs=torch.softmax(torch.randn(T, E, generator=g), -1),
        logp=-torch.rand(B, T, generator=g), logp_old=-torch.rand(B, T, generator=g),
        mask_bt=torch.rand(B, T, generator=g) > 0.3, adv=torch.randn(B, generator=g),
        rewards=torch.randn(B, 8, generator=g), x=torch.randn(16, 2, generator=g),
    )


X = _inputs()
CASES = {
    "coactivation_counts": (coactivation.coactivation_counts, (X["topk"], E, X["mask"])),
    "tokens_per_expert": (coactivation.tokens_per_expert, (X["counts"],)),
    "coactivation_matrix": (coactivation.coactivation_matrix, (X["counts"], X["mask"].sum())),
    "active_experts": (coactivation.active_experts, (X["counts"],)),
    "neighbour_masks": (coactivation.neighbour_masks, (X["coact"], K)),
    "prototype_cosines": (kernels.prototype_cosines, (X["protos"],)),
    "prototype_kernel": (kernels.prototype_kernel, (X["protos"], 1.0, "cos")),
    "prototype_kernel_median": (kernels.prototype_kernel,
                                (X["protos"], 1.0, "sq_cos", "median", 3.0)),
    "cross_kernel": (kernels.cross_kernel, (X["protos"][:2], X["protos"], 0.5)),
    "off_diagonal": (kernels.off_diagonal, (X["kernel"],)),
    "median_off_diagonal": (kernels.median_off_diagonal, (X["kernel"],)),
    "median_bandwidth": (kernels.median_bandwidth, (torch.stack([X["protos"]] * 2),)),
    "kernel_tau": (kernels.kernel_tau, (X["protos"], 1.0, "sq_cos", "median", 2.0)),
    "power_step_partial": (prototypes.power_step_partial, (X["weight"], X["protos"])),
    "normalize": (prototypes.normalize, (X["grads"], X["grads"])),
    "power_iteration": (prototypes.power_iteration, (X["weight"], X["protos"], 2)),
    "start_vectors": (prototypes.start_vectors, (E, D)),
    "init_prototypes": (prototypes.init_prototypes, (X["weight"], 5, 1)),
    "align_signs": (prototypes.align_signs, (-X["protos"], X["protos"])),
    "attraction_weights": (stein.attraction_weights, (X["kernel"], X["coactive"], K)),
    "mix_gathered": (stein.mix_gathered, (X["grads"][X["idx"]], X["w"])),
    "gather_mix": (stein.gather_mix, (X["grads"], X["idx"], X["w"])),
    "attraction": (stein.attraction, (X["grads"], X["kernel"], X["coactive"], K)),
    "repulsion_weights": (stein.repulsion_weights, (X["inactive"],)),
    "repulsion_grad_from_z": (stein.repulsion_grad_from_z,
                              (X["weight"], X["protos"], X["protos"], X["inactive"], 1.0)),
    "repulsion_grad": (stein.repulsion_grad, (X["weight"], X["protos"], X["inactive"], 1.0)),
    "repulsion_grad_median": (stein.repulsion_grad, (X["weight"], X["protos"], X["inactive"], 1.0,
                                                     "sq_cos", 0, "median", 2.0)),
    "repulsion_factors_from_z": (stein.repulsion_factors_from_z,
                                 (X["weight"], X["protos"], X["protos"], X["inactive"], 1.0)),
    "rank_two_norm": (stein.rank_two_norm, stein.repulsion_factors_from_z(
        X["weight"], X["protos"], X["protos"], X["inactive"], 1.0)),
    "stein_transport": (lambda *a: stein.stein_transport(
        *a, topm=K, repulsion_EP=a[0], repulsion_coef=0.1),
        (X["grads"], X["kernel"], X["coactive"], X["counts"].diagonal() > 0)),
    "keep_inactive": (stein.keep_inactive, (X["grads"], -X["grads"], X["counts"].diagonal() > 0)),
    "rbf_kernel": (stein.rbf_kernel, (X["x"],)),
    "svgd_direction": (stein.svgd_direction, (X["x"], -X["x"])),
    "normalized": (specialization.normalized, (X["grads"].sum(), torch.tensor(3.0))),
    "orthogonality_per_token": (specialization.orthogonality_per_token, (X["out"],)),
    "orthogonality_cosine_per_token": (specialization.orthogonality_cosine_per_token, (X["out"],)),
    "gated_sum_and_orthogonality": (specialization.gated_sum_and_orthogonality,
                                    (X["out"], X["gates"])),
    "orthogonality_loss_sum": (specialization.orthogonality_loss_sum, (X["out"], X["mask"])),
    "orthogonality_loss": (specialization.orthogonality_loss, (X["out"], X["mask"], 40.0)),
    "routing_variance_loss_sum": (specialization.routing_variance_loss_sum,
                                  (X["probs"], X["mask"])),
    "routing_variance_loss": (specialization.routing_variance_loss, (X["probs"], X["mask"])),
    "routing_variance_loss_sum_from_logits": (specialization.routing_variance_loss_sum_from_logits,
                                              (X["probs"].log(),)),
    "prototype_signs": (trust_region.prototype_signs, (X["protos"], -X["protos"])),
    "barycenters": (trust_region.barycenters, (X["topk"], X["gates"], X["protos"])),
    "anchor_distance_sum": (trust_region.anchor_distance_sum, (
        X["topk"], X["gates"], X["protos"], X["topk"].flip(0), X["gates"], X["protos"], X["mask"])),
    "anchor_distance": (trust_region.anchor_distance, (
        X["topk"], X["gates"], -X["protos"], X["topk"].flip(0), X["gates"], X["protos"])),
    "behaviour_drift_sum": (trust_region.behaviour_drift_sum,
                            (X["logp"], X["logp_old"], X["mask_bt"])),
    "behaviour_drift": (trust_region.behaviour_drift, (X["logp"], X["logp_old"], X["mask_bt"])),
    "sequence_logratio": (trust_region.sequence_logratio, (X["logp"], X["logp_old"], X["mask_bt"])),
    "tempered_ess": (trust_region.tempered_ess, (X["adv"] * 100, 0.25)),
    "behaviour_ess": (trust_region.behaviour_ess,
                      (X["logp"], X["logp_old"], X["mask_bt"], 1.0, "token")),
    "refresh_reason": (trust_region.refresh_reason,
                       (X["adv"][0], X["adv"][1], torch.tensor(False), torch.tensor(3))),
    "refresh_needed": (trust_region.refresh_needed,
                       (X["adv"][0], X["adv"][1], torch.tensor(False), torch.tensor(3))),
    "scaled_update": (trust_region.scaled_update, (X["grads"], -X["grads"], 0.25)),
    "decide": (trust_region.decide, (X["adv"][0] < 0, torch.tensor(1), "backtrack", 3)),
    "forces_refresh": (trust_region.forces_refresh, (torch.tensor([0, 1, 2, 3]),)),
    "group_advantages": (grpo.group_advantages, (X["rewards"],)),
    "dr_grpo_advantages": (grpo.dr_grpo_advantages, (X["rewards"],)),
    "rloo_advantages": (grpo.rloo_advantages, (X["rewards"],)),
    "seq_mean_token_mean": (grpo.seq_mean_token_mean, (X["logp"], X["mask_bt"])),
    "token_mean": (grpo.token_mean, (X["logp"], X["mask_bt"], 7)),
    "aggregation_count": (grpo.aggregation_count, (X["mask_bt"], "seq_mean_token_mean")),
    "policy_loss": (lambda *a: grpo.policy_loss(*a, clip_eps=0.2, kl_coef=0.1, logp_ref=a[1]),
                    (X["logp"], X["logp_old"], X["adv"], X["mask_bt"])),
    "grpo_clip_loss": (grpo.grpo_clip_loss, (X["logp"], X["logp_old"], X["adv"], X["mask_bt"])),
    "vp2o_loss": (grpo.vp2o_loss, (X["logp"], X["logp_old"], X["adv"], X["mask_bt"])),
    "router_entropy": (diagnostics.router_entropy, (X["probs"], X["mask"])),
    "utilisation": (diagnostics.utilisation, (X["counts"].diagonal(),)),
    "prototype_overlap": (diagnostics.prototype_overlap, (X["protos"],)),
    "coactivation_overlap": (diagnostics.coactivation_overlap, (X["coact"],)),
    "coactivation_cosine": (diagnostics.coactivation_cosine, (X["counts"],)),
    "kernel_mass": (diagnostics.kernel_mass, (X["kernel"],)),
    "kernel_spread": (diagnostics.kernel_spread, (X["kernel"],)),
    "expert_shares": (diagnostics.expert_shares, (X["counts"].diagonal() > 0, X["coactive"],
                                                  X["inactive"])),
    "ratio_quantiles": (diagnostics.ratio_quantiles, (X["logp"], X["logp_old"], X["mask_bt"])),
    "relative_change": (diagnostics.relative_change, (X["grads"], -X["grads"], X["grads"], 0.1)),
    "transport_norms": (diagnostics.transport_norms, (X["grads"], -X["grads"], X["grads"], 0.1)),
}


def test_every_public_function_has_a_case():
    public = {
        name for module in MODULES for name, fn in vars(module).items()
        if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")
    }
    assert public - NOT_TENSOR_FUNCTIONS == {name.removesuffix("_median") for name in CASES}


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return [_assert_same(a[k], b[k]) for k in a]
    if isinstance(a, (tuple, list)):
        return [_assert_same(x, y) for x, y in zip(a, b, strict=True)]
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), equal_nan=True, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_traces_fullgraph(name):
    fn, args = CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    _assert_same(compiled(*args), fn(*args))

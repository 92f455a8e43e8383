"""Stein transport of expert gradients: kernel attraction among co-active experts plus repulsion.

What (method §2.8): the experts of one MoE layer are SVGD particles. The gradient handed to the
optimizer for an active expert i is
    grad_i = sum_j w_ij g_j + alpha * dR_i/dW_i,
with attraction weights w_ij = M_bar_ij k_ij / sum_l M_bar_il k_il over i's co-active neighbours
and itself (M_bar = M_co + I, row-stochastic), and a repulsion R_i = sum_j v_ij k(u_i(W_i), u_j)
from i's inactive set (v_ij = M_in_ij / max(1, sum_l M_in_il)) through one differentiable power
step u_i(W_i) = normalize(W_i W_i^T stopgrad(u_i)), acting on fc2's weight W_i only.
Experts outside the active set get a zero gradient.

Why sparse: each row of w has at most m + 1 non-zeros, so the attraction gathers m + 1 gradients
per expert ([E, m+1] indices and weights) instead of an E x E x P product; cost is O(E (m+1) P)
in one fused `embedding_bag` pass with no extra buffer. The split into `attraction_weights` +
`mix_gathered` lets the expert-parallel code fetch only the needed neighbour gradients and mix
them locally. The repulsion gradient is closed-form (no autograd graph); `repulsion_grad_from_z`
takes z = W W^T v already summed over the expert-TP group, so every other term is local to the
F shard.

`svgd_direction` is textbook SVGD (Liu & Wang 2016, eq. 8) with an RBF kernel and the median
heuristic: the reference the transport reduces to with all-ones masks, 1/n weights and an RBF
kernel on particle coordinates (method §2.8 "Reductions to test").

Departures (OURS, method §2.8): the paper's SVGD acts on expert gradients with a prototype kernel
and
co-activation masks; padded neighbour slots point at the expert itself with weight 0 so they cost
no communication; ``topm`` above E - 1 acts as E - 1.

Shape legend: E experts (X local experts under expert parallelism), D hidden, F expert ffn,
P flattened expert params, M1 = m + 1 neighbour slots (self first), N particles.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import embedding_bag

from .kernels import cross_kernel, kernel_tau
from .prototypes import power_step_partial


def _self_index(num_experts: int, like: torch.Tensor) -> torch.Tensor:
    """[..., E, 1] long tensor holding each row's own expert index."""
    idx_E1 = torch.arange(num_experts, device=like.device).unsqueeze(-1)
    return idx_E1.expand(*like.shape[:-2], num_experts, 1)


def attraction_weights(
    kernel_EE: torch.Tensor, coactive_EE: torch.Tensor, topm: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse row-stochastic attraction weights (method §2.8): (idx [..., E, M1], w [..., E, M1]).

    Column 0 is the expert itself; columns 1..m its co-active neighbours; unused slots hold the
    expert's own index with weight 0. M1 = min(topm, E - 1) + 1 is static. Rows of ``coactive_EE``
    must have at most ``topm`` True entries (as `neighbour_masks` guarantees).
    """
    num_experts = kernel_EE.shape[-1]
    self_E1 = _self_index(num_experts, kernel_EE)
    self_w_E1 = torch.diagonal(kernel_EE, dim1=-2, dim2=-1).unsqueeze(-1)
    m = min(int(topm), num_experts - 1)
    if m <= 0:
        return self_E1, torch.ones_like(self_w_E1)
    nb_idx_EM = torch.topk(coactive_EE.to(kernel_EE.dtype), m, dim=-1).indices
    nb_valid_EM = torch.gather(coactive_EE, -1, nb_idx_EM)
    nb_idx_EM = torch.where(nb_valid_EM, nb_idx_EM, self_E1)
    nb_w_EM = torch.where(nb_valid_EM, torch.gather(kernel_EE, -1, nb_idx_EM), 0.0)
    idx_EM1 = torch.cat([self_E1, nb_idx_EM], dim=-1)
    w_EM1 = torch.cat([self_w_E1, nb_w_EM], dim=-1)
    return idx_EM1, w_EM1 / w_EM1.sum(-1, keepdim=True)


def mix_gathered(neigh_grads_EM1P: torch.Tensor, w_EM1: torch.Tensor) -> torch.Tensor:
    """a_i = sum_m w[i, m] * neigh_grads[i, m] for neighbour gradients gathered by the caller."""
    return torch.einsum("...em,...emp->...ep", w_EM1.to(neigh_grads_EM1P.dtype), neigh_grads_EM1P)


def gather_mix(
    grads_EP: torch.Tensor, idx_EM1: torch.Tensor, w_EM1: torch.Tensor
) -> torch.Tensor:
    """a_i = sum_m w[i, m] g[idx[i, m]]: one fused pass (`embedding_bag` with per-slot weights).

    Reads m+1 rows and writes one per output row, with no [E, M1, P] buffer. Leading batch dims
    (layers) are flattened with per-layer index offsets. The output has idx's rows: [..., R, P]
    for idx [..., R, M1] (R = E for the attraction; tokens for routing barycenters).
    """
    num_rows, num_params = grads_EP.shape[-2:]
    slots = idx_EM1.shape[-1]
    num_layers = math.prod(grads_EP.shape[:-2])
    offsets_L11 = torch.arange(num_layers, device=idx_EM1.device).view(-1, 1, 1) * num_rows
    flat_idx = (idx_EM1.reshape(num_layers, -1, slots) + offsets_L11).reshape(-1, slots)
    flat_w = w_EM1.reshape(-1, slots).to(grads_EP.dtype)
    mixed = embedding_bag(
        flat_idx, grads_EP.reshape(-1, num_params), per_sample_weights=flat_w, mode="sum"
    )
    return mixed.view(*idx_EM1.shape[:-1], num_params)


def attraction(
    grads_EP: torch.Tensor,
    kernel_EE: torch.Tensor,
    coactive_EE: torch.Tensor,
    topm: int | None = None,
) -> torch.Tensor:
    """Attraction a_i = sum_j w_ij g_j over self + co-active neighbours (method §2.8).

    Pass ``topm`` (= coact_topm) for the O(E (m+1) P) cost; None means m = E - 1 (always correct,
    but dense).
    """
    num_experts = kernel_EE.shape[-1]
    m = num_experts - 1 if topm is None else topm
    idx_EM1, w_EM1 = attraction_weights(kernel_EE, coactive_EE, m)
    return gather_mix(grads_EP, idx_EM1, w_EM1)


def repulsion_weights(
    inactive_EE: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """v_ij = M_in_ij / max(1, sum_l M_in_il) (method §2.8), [..., E, E] in ``dtype``."""
    mask_EE = inactive_EE.to(dtype)
    return mask_EE / mask_EE.sum(-1, keepdim=True).clamp_min(1.0)


def repulsion_factors_from_z(
    weight_XDF: torch.Tensor,
    protos_ED: torch.Tensor,
    z_XD: torch.Tensor,
    inactive_XE: torch.Tensor,
    tau0: float,
    form: str = "sq_cos",
    expert_offset: int = 0,
    bandwidth: str = "fixed",
    sharpness: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dR_i/dW_i = left_i @ right_i, a rank-two [D, F] matrix per expert: ([X, D, 2], [X, 2, F]).

    With v = u_i (stopgrad), y = W^T v (local F shard), u = z/||z||, gamma = dR/du =
    sum_j v_ij k'(u . u_j) u_j and g_z = (I - u u^T) gamma / ||z||:
        dR/dW = g_z y^T + v (W^T g_z)^T = [g_z, v] @ [y; W^T g_z].
    z = W W^T v must already be summed over the expert-TP group (method §2.8). Callers that add the
    repulsion into a gradient buffer use the factors (one batched matmul-add, no [X, D, F] tensor).
    ``weight_XDF`` holds the X local experts (global ids expert_offset .. expert_offset+X-1),
    ``protos_ED`` all E prototypes of the layer (tau uses this E and, for the ``median``
    bandwidth, these prototypes), ``inactive_XE`` their rows.
    """
    num_local, num_experts = weight_XDF.shape[-3], protos_ED.shape[-2]
    dtype = torch.promote_types(weight_XDF.dtype, torch.float32)
    protos_ED = protos_ED.to(dtype)
    v_XD = protos_ED[..., expert_offset : expert_offset + num_local, :]
    y_XF = torch.matmul(v_XD.to(weight_XDF.dtype).unsqueeze(-2), weight_XDF).squeeze(-2).to(dtype)
    z_XD = z_XD.to(dtype)
    z_norm_X1 = torch.linalg.vector_norm(z_XD, dim=-1, keepdim=True).clamp_min(1e-30)
    u_XD = z_XD / z_norm_X1
    tau = kernel_tau(protos_ED, tau0, form, bandwidth, sharpness)
    _, dk_XE = cross_kernel(u_XD, protos_ED, tau, form)
    gamma_XD = torch.matmul(repulsion_weights(inactive_XE, dtype) * dk_XE, protos_ED)
    g_z_XD = (gamma_XD - u_XD * (u_XD * gamma_XD).sum(-1, keepdim=True)) / z_norm_X1
    wt_g_XF = torch.matmul(g_z_XD.to(weight_XDF.dtype).unsqueeze(-2), weight_XDF).squeeze(-2)
    left_XD2 = torch.stack([g_z_XD, v_XD], dim=-1)
    right_X2F = torch.stack([y_XF, wt_g_XF.to(dtype)], dim=-2)
    return left_XD2, right_X2F


def repulsion_grad_from_z(
    weight_XDF: torch.Tensor,
    protos_ED: torch.Tensor,
    z_XD: torch.Tensor,
    inactive_XE: torch.Tensor,
    tau0: float,
    form: str = "sq_cos",
    expert_offset: int = 0,
    bandwidth: str = "fixed",
    sharpness: float = 1.0,
) -> torch.Tensor:
    """Closed-form dR_i/dW_i [X, D, F] given z = W W^T v summed over the expert-TP group (method
    §2.8): the product of `repulsion_factors_from_z` (float32 or wider)."""
    left_XD2, right_X2F = repulsion_factors_from_z(
        weight_XDF, protos_ED, z_XD, inactive_XE, tau0, form, expert_offset, bandwidth, sharpness
    )
    return torch.matmul(left_XD2, right_X2F)


def rank_two_norm(left_XD2: torch.Tensor, right_X2F: torch.Tensor) -> torch.Tensor:
    """||left @ right||_F over the last three dims, from [.., 2, 2] Gram matrices (no product)."""
    gram_l = torch.matmul(left_XD2.transpose(-1, -2), left_XD2)
    gram_r = torch.matmul(right_X2F, right_X2F.transpose(-1, -2))
    return (gram_l * gram_r).sum((-3, -2, -1)).clamp_min(0.0).sqrt()


def repulsion_grad(
    weight_EDF: torch.Tensor,
    protos_ED: torch.Tensor,
    inactive_EE: torch.Tensor,
    tau0: float,
    form: str = "sq_cos",
    expert_offset: int = 0,
    bandwidth: str = "fixed",
    sharpness: float = 1.0,
) -> torch.Tensor:
    """dR_i/dW_i for every expert of an un-sharded fc2 weight [E, D, F] (method §2.8).

    Equals autograd of sum_i R_i through one differentiable power step (see the module docstring).
    Under expert parallelism pass the local experts' weights, all E prototypes, the local rows of
    the inactive mask and ``expert_offset``; under expert-TP use `repulsion_grad_from_z`.
    """
    num_local = weight_EDF.shape[-3]
    v_ED = protos_ED[..., expert_offset : expert_offset + num_local, :]
    z_ED = power_step_partial(weight_EDF, v_ED)
    return repulsion_grad_from_z(
        weight_EDF, protos_ED, z_ED, inactive_EE, tau0, form, expert_offset, bandwidth, sharpness
    )


def stein_transport(
    grads_EP: torch.Tensor,
    kernel_EE: torch.Tensor,
    coactive_EE: torch.Tensor,
    active_E: torch.Tensor,
    *,
    topm: int | None = None,
    repulsion_EP: torch.Tensor | None = None,
    repulsion_coef: float = 0.0,
) -> torch.Tensor:
    """grad_i = [i in A] (sum_j w_ij g_j + alpha dR_i/dW_i) (method §2.8), [..., E, P] -> same.

    ``repulsion_EP`` is dR/dW laid out like ``grads_EP`` (zeros outside fc2's weight); callers that
    transport several parameter tensors call this once per tensor with the same masks.
    """
    out_EP = attraction(grads_EP, kernel_EE, coactive_EE, topm)
    if repulsion_EP is not None and repulsion_coef != 0.0:
        out_EP = out_EP + repulsion_coef * repulsion_EP.to(out_EP.dtype)
    return torch.where(active_E.unsqueeze(-1), out_EP, 0.0)


def keep_inactive(
    new_EP: torch.Tensor, old_EP: torch.Tensor, active_E: torch.Tensor
) -> torch.Tensor:
    """`freeze_inactive` (method §2.8): rows of experts outside A are put back to their old
    values."""
    return torch.where(active_E.unsqueeze(-1), new_EP, old_EP)


def rbf_kernel(
    particles_NP: torch.Tensor, bandwidth: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(K_ij = exp(-||x_i - x_j||^2 / h), h): h = median(||x_i - x_j||^2) / log(N + 1) if None.

    The median heuristic as in Liu & Wang's reference code (log(N+1), diagonal included).
    """
    sq_norm_N = (particles_NP * particles_NP).sum(-1)
    gram_NN = particles_NP @ particles_NP.transpose(-1, -2)
    sq_dist_NN = (sq_norm_N.unsqueeze(-1) + sq_norm_N.unsqueeze(-2) - 2.0 * gram_NN).clamp_min(0.0)
    if bandwidth is None:
        median = torch.median(sq_dist_NN.reshape(-1))
        bandwidth = (median / math.log(particles_NP.shape[-2] + 1)).clamp_min(1e-12)
    return torch.exp(-sq_dist_NN / bandwidth), bandwidth


def svgd_direction(
    particles_NP: torch.Tensor,
    score_NP: torch.Tensor,
    bandwidth: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Textbook SVGD update (Liu & Wang 2016, eq. 8) with an RBF kernel k = exp(-||x - y||^2 / h):

        phi(x_i) = 1/N sum_j [k(x_j, x_i) score(x_j) + grad_{x_j} k(x_j, x_i)]
                 = 1/N [K score + (2/h) (rowsum(K) x_i - K x)]_i.
    Ascent direction: x <- x + eps * phi moves particles toward the target with this score.
    """
    k_NN, h = rbf_kernel(particles_NP, bandwidth)
    drive_NP = k_NN @ score_NP
    spread_NP = k_NN.sum(-1, keepdim=True) * particles_NP - k_NN @ particles_NP
    return (drive_NP + (2.0 / h) * spread_NP) / particles_NP.shape[-2]

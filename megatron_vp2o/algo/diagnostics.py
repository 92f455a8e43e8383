"""Per-layer diagnostics of the expert particle system (method §2.13).

What: the statistics the paper says it lacked, as 0-dim device tensors for logging: router
entropy, expert utilisation (tokens per expert as a fraction, its max/mean load factor and the
number of dead experts), expert overlap (mean off-diagonal |c_ij| of prototypes, mean
off-diagonal C, and the co-activation cosine n_ij / sqrt(n_i n_j)),
kernel mass (mean off-diagonal k_ij), kernel spread (min, median, max off-diagonal k_ij), the
shares of experts active / co-active / inactive, the norms of the attraction and repulsion parts
of the transported gradient and their size relative to the raw gradient.
The budgets (D_anc, D_beh, ESS) come from
`trust_region`; refresh and step-decision counts are kept by the RL loop.
Why pure: they are reduced over ranks by the caller like every other statistic, and computing
them never syncs the host (the logger reads them once per step).

Departures: none in the math; the names are ours (method §2.13 lists the quantities only).

Shape legend: T tokens, E experts, D hidden, P flattened expert params.
"""

from __future__ import annotations

from typing import Dict

import torch

from .scalars import as_scalar

from .kernels import median_off_diagonal, off_diagonal

def _off_diagonal_mean(matrix_EE: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of [..., E, E] (0 when E == 1)."""
    num_experts = matrix_EE.shape[-1]
    eye_EE = torch.eye(num_experts, dtype=torch.bool, device=matrix_EE.device)
    total = torch.where(eye_EE, 0.0, matrix_EE).sum((-1, -2))
    return total / max(num_experts * (num_experts - 1), 1)


def router_entropy(
    probs_TE: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """mean_t H(p[t, :]) = -mean_t sum_e p log p over valid tokens (or / ``normalizer``)."""
    probs_TE = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32))
    entropy_T = -torch.special.xlogy(probs_TE, probs_TE).sum(-1)
    if token_mask_T is None:
        token_mask_T = torch.ones_like(entropy_T, dtype=torch.bool)
    valid_T = token_mask_T.to(torch.bool)
    count = valid_T.sum() if normalizer is None else normalizer
    denom = as_scalar(count, entropy_T).clamp_min(1.0)
    return torch.where(valid_T, entropy_T, 0.0).sum() / denom


def utilisation(tokens_E: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Share of routed tokens per expert [E], load factor max/mean, and the dead-expert count."""
    tokens_E = tokens_E.to(torch.float32)
    total = tokens_E.sum(-1, keepdim=True).clamp_min(1.0)
    share_E = tokens_E / total
    return {
        "share": share_E,
        "load_factor": share_E.amax(-1) * tokens_E.shape[-1],
        "dead_experts": (tokens_E == 0).sum(-1),
    }


def prototype_overlap(protos_ED: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal |u_i . u_j| (0: orthogonal prototypes, 1: collapsed)."""
    return _off_diagonal_mean(torch.matmul(protos_ED, protos_ED.transpose(-1, -2)).abs())


def coactivation_overlap(coact_EE: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal C_ij (co-activation rate of an average expert pair)."""
    return _off_diagonal_mean(coact_EE)


def coactivation_cosine(counts_EE: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal n_ij / sqrt(n_i n_j) of raw pair counts (diagonal n_i: tokens per expert):
    the cosine of two experts' routing indicators over the tokens. 1: every pair that fires fires
    together (redundant experts); (K-1)/(E-1) in expectation for independent uniform top-K routing.
    (The mean of C_ij itself is K(K-1)/(E(E-1)) for any routing: each token adds K(K-1) pair
    counts.)"""
    tokens_E = torch.diagonal(counts_EE, dim1=-2, dim2=-1)
    norm_EE = (tokens_E.unsqueeze(-1) * tokens_E.unsqueeze(-2)).sqrt().clamp_min(1.0)
    return _off_diagonal_mean(counts_EE / norm_EE)


def kernel_mass(kernel_EE: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal k_ij (how strongly experts look alike to the kernel)."""
    return _off_diagonal_mean(kernel_EE)


def kernel_spread(kernel_EE: torch.Tensor) -> Dict[str, torch.Tensor]:
    """min, median and max of the off-diagonal k_ij per layer ([..., E, E] -> [...] each).

    A kernel that tells experts apart spreads these; max/min near 1 means the attraction mixes
    every co-active neighbour with the same weight whatever the geometry. Needs E >= 2.
    """
    off = off_diagonal(kernel_EE)
    return {"min": off.amin(-1), "median": median_off_diagonal(kernel_EE), "max": off.amax(-1)}


def expert_shares(
    active_E: torch.Tensor, coactive_EE: torch.Tensor, inactive_EE: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Share of experts active (>= 1 routed token), and per active expert the mean share of the
    other E - 1 experts in its co-active (attraction) and inactive (repulsion) sets ([...] each).
    """
    num_experts = active_E.shape[-1]
    act = active_E.to(torch.float32)
    n_act = act.sum(-1).clamp_min(1.0)
    others = max(num_experts - 1, 1)
    co_E = coactive_EE.to(torch.float32).sum(-1) / others
    in_E = inactive_EE.to(torch.float32).sum(-1) / others
    return {
        "active": act.mean(-1),
        "coactive": (co_E * act).sum(-1) / n_act,
        "inactive": (in_E * act).sum(-1) / n_act,
    }


def ratio_quantiles(
    logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-token importance ratio pi / pi_old over valid tokens: p50, p99 (nearest rank) and max.

    What the clip bounds and VP2O's average-drift budget does not; static shapes (a sort over all
    tokens, masked ones sent to +inf, the rank read from the valid count). 1.0 with no valid token.
    """
    valid = mask_BT.to(torch.bool).reshape(-1)
    ratio = torch.exp((logp_BT - logp_old_BT).to(torch.float32)).reshape(-1)
    values = torch.sort(torch.where(valid, ratio, float("inf"))).values
    count = valid.sum()

    def rank(q: float) -> torch.Tensor:
        idx = (torch.ceil(q * count.to(torch.float32)) - 1).clamp_min(0).to(torch.long)
        picked = values.gather(0, idx.reshape(1)).reshape(())
        return torch.where(count > 0, picked, 1.0)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": rank(1.0)}


def relative_change(
    grads_EP: torch.Tensor,
    attracted_EP: torch.Tensor,
    repulsion_EP: torch.Tensor | None = None,
    repulsion_coef: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """How much the Stein transport changes the gradient, relative to the raw one, over the layer:
    attraction ||a - g|| / ||g||, repulsion ||alpha dR/dW|| / ||g|| and total
    ||a + alpha dR/dW - g|| / ||g|| (0 when the raw gradient is 0)."""
    raw = torch.linalg.vector_norm(grads_EP).clamp_min(1e-30)
    out = {"attraction": torch.linalg.vector_norm(attracted_EP - grads_EP) / raw}
    total_EP = attracted_EP
    if repulsion_EP is not None:
        rep_EP = repulsion_coef * repulsion_EP.to(attracted_EP.dtype)
        out["repulsion"] = torch.linalg.vector_norm(rep_EP) / raw
        total_EP = attracted_EP + rep_EP
    out["total"] = torch.linalg.vector_norm(total_EP - grads_EP) / raw
    return out


def transport_norms(
    grads_EP: torch.Tensor,
    attracted_EP: torch.Tensor,
    repulsion_EP: torch.Tensor | None = None,
    repulsion_coef: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """L2 norms over the layer of the raw gradient, the attraction shift a - g and alpha dR/dW."""
    norms = {
        "grad_norm": torch.linalg.vector_norm(grads_EP),
        "attraction_shift_norm": torch.linalg.vector_norm(attracted_EP - grads_EP),
    }
    if repulsion_EP is not None:
        norms["repulsion_norm"] = repulsion_coef * torch.linalg.vector_norm(repulsion_EP)
    return norms

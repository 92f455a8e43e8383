"""Co-activation statistics and the neighbour masks they induce (method §2.5, 2.7, 2.8 active set).

What: which experts are routed to together. With the hard top-k mask M [T, E] of one layer,
counts = M^T M (raw pair counts; the diagonal is the tokens per expert) and C = counts / T with the
diagonal zeroed (method §2.5). Each expert's co-active neighbours are its m largest positive
entries of
C[i, :] (method §2.7); all other experts are its inactive set, the repulsion targets (method §2.8).

Why raw counts: counts are integers stored in float, exact below 2^24 per entry, so they can be
summed over micro-batches and all-reduced over the data/context/sequence-parallel ranks that see
other tokens of the same step; only then normalise with the global token count.

Departures: counts are built with a scatter-add of the K^2 pairs per token (O(T K^2), no [T, E]
one-hot matmul); top-k indices of a token are assumed distinct (as every top-k router produces).
Ties in C are broken by `torch.topk` (deterministic for a given input on a given device).

Shape legend: T tokens, K top-k, E experts, M neighbours (m = `coact_topm`).
"""

from __future__ import annotations

import torch

from .scalars import as_scalar


def coactivation_counts(
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    token_mask_T: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Raw pair counts counts[i, j] = #{t : i, j both in topk(t)}, masked tokens excluded.

    counts_EE = M^T M for the hard top-k mask M (method §2.5); the diagonal is tokens per expert.
    Un-normalised so that micro-batches and ranks can be summed before `coactivation_matrix`.
    """
    num_tokens, top_k = topk_idx_TK.shape
    idx_TK = topk_idx_TK.long()
    pair_TKK = idx_TK.unsqueeze(-1) * num_experts + idx_TK.unsqueeze(-2)
    if token_mask_T is None:
        ones_TKK = torch.ones(pair_TKK.shape, dtype=dtype, device=idx_TK.device)
    else:
        ones_TKK = token_mask_T.to(dtype).view(num_tokens, 1, 1).expand(num_tokens, top_k, top_k)
    flat_counts = torch.zeros(num_experts * num_experts, dtype=dtype, device=idx_TK.device)
    flat_counts.scatter_add_(0, pair_TKK.reshape(-1), ones_TKK.reshape(-1))
    return flat_counts.view(num_experts, num_experts)


def tokens_per_expert(counts_EE: torch.Tensor) -> torch.Tensor:
    """Routed tokens per expert: the diagonal of the raw counts ([..., E, E] -> [..., E])."""
    return torch.diagonal(counts_EE, dim1=-2, dim2=-1)


def coactivation_matrix(
    counts_EE: torch.Tensor, num_tokens: torch.Tensor | float
) -> torch.Tensor:
    """C = counts / T with a zero diagonal (method §2.5); T is the global routed-token count (>=
    1)."""
    num_experts = counts_EE.shape[-1]
    denom = as_scalar(num_tokens, counts_EE)
    eye_EE = torch.eye(num_experts, dtype=torch.bool, device=counts_EE.device)
    return torch.where(eye_EE, 0.0, counts_EE / denom.clamp_min(1.0))


def active_experts(counts_or_tokens: torch.Tensor) -> torch.Tensor:
    """Active set A = experts with >= 1 routed token this step (method §2.8), as a bool tensor.

    A 1-D input is tokens per expert [E]; an input with 2+ dims is raw counts [..., E, E], whose
    diagonal holds the tokens per expert.
    """
    if counts_or_tokens.dim() == 1:
        return counts_or_tokens > 0
    return tokens_per_expert(counts_or_tokens) > 0


def neighbour_masks(
    coact_EE: torch.Tensor, topm: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(co-active, inactive) bool masks [E, E] (method §2.7).

    coactive[i, j] = j is among the m = ``topm`` largest C[i, :] (j != i) and C[i, j] > 0.
    inactive = not co-active and j != i. Rows are per expert (no symmetrisation). ``topm`` is a
    static int (values above E - 1 act as E - 1); ``coact_EE`` may have leading batch dims.
    """
    num_experts = coact_EE.shape[-1]
    eye_EE = torch.eye(num_experts, dtype=torch.bool, device=coact_EE.device)
    m = min(int(topm), num_experts - 1)
    if m <= 0:
        coactive_EE = torch.zeros(coact_EE.shape, dtype=torch.bool, device=coact_EE.device)
        return coactive_EE, ~eye_EE.expand(coact_EE.shape)
    scores_EE = coact_EE.masked_fill(eye_EE, float("-inf"))
    top_vals_EM, top_idx_EM = torch.topk(scores_EE, m, dim=-1)
    coactive_EE = torch.zeros(coact_EE.shape, dtype=torch.bool, device=coact_EE.device)
    coactive_EE = coactive_EE.scatter(-1, top_idx_EM, top_vals_EM > 0)
    inactive_EE = ~coactive_EE & ~eye_EE
    return coactive_EE, inactive_EE

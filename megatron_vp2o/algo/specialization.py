"""Expert specialisation losses: output orthogonality and routing variance (method §2.9).

What (FOUND, Guo et al. 2025, arXiv 2505.22323):
- Orthogonality: for each token t and each ordered pair (j, k), j != k, of its top-k experts with
  raw (un-gated) outputs x_j, x_k, the squared norm of the projection of x_j onto x_k,
      || (<x_j, x_k> / (<x_k, x_k> + 1e-6)) x_k ||^2
          = <x_j, x_k>^2 ||x_k||^2 / (||x_k||^2 + 1e-6)^2,
  summed over pairs and tokens and divided by K * T. Weight `ortho_coef`.
- Routing variance: L_var = -mean_t Var_e(p[t, e]), the unbiased variance across experts of the full
  router probabilities; minimising it pushes routing away from uniform. Weight `var_coef`.
Why: both push experts apart in function space, complementing the parameter-space repulsion.

Global normalisation (CONTRIBUTING.md §9): the ``*_sum`` variants return (sum, count) so that a
micro-batched step can add sums and counts over micro-batches and data-parallel ranks; the plain
functions divide by their local count, or by ``normalizer`` (the global count) when given.

Departures: outputs are gathered per token with the top-k indices (the caller builds
expert_out_TKD that way), rejecting the official code's reshape that paired outputs in expert order
(method §4). Masked tokens are excluded with `torch.where`, so garbage in padded rows cannot leak
in.
Math runs in at least float32.

Shape legend: T tokens, K top-k, D hidden, E experts.
"""

from __future__ import annotations

import torch

from .scalars import as_scalar

ORTHO_EPS = 1e-6


def _valid(token_mask_T: torch.Tensor | None, like_T: torch.Tensor) -> torch.Tensor:
    """Bool token mask (all True when None)."""
    if token_mask_T is None:
        return torch.ones(like_T.shape, dtype=torch.bool, device=like_T.device)
    return token_mask_T.to(torch.bool)


def normalized(
    total: torch.Tensor, count: torch.Tensor, normalizer: torch.Tensor | float | None = None
) -> torch.Tensor:
    """total / count, or total / normalizer when given (a global count); denominators >= 1."""
    denom = count if normalizer is None else normalizer
    return total / as_scalar(denom, total).clamp_min(1.0)


def orthogonality_per_token(expert_out_TKD: torch.Tensor) -> torch.Tensor:
    """Per-token sum over ordered top-k pairs j != k of ||proj_{x_k} x_j||^2 -> [T] (method §2.9).

    = sum_{j<k} <x_j, x_k>^2 (s_j + s_k) with s_k = n_k / (n_k + eps)^2, n_k = ||x_k||^2. For
    K <= 4 the K(K+1)/2 dot products are formed pairwise (no [T, K, K] batched matmul of tiny
    matrices, ~2x faster forward + backward on CPU), else with one batched Gram matmul.
    """
    x_TKD = expert_out_TKD.to(torch.promote_types(expert_out_TKD.dtype, torch.float32))
    top_k = x_TKD.shape[-2]
    if top_k <= _PAIRWISE_MAX_K:
        xs = x_TKD.unbind(-2)
        scale = []
        for x_TD in xs:
            sq_norm_T = (x_TD * x_TD).sum(-1)
            scale.append(sq_norm_T / (sq_norm_T + ORTHO_EPS) ** 2)
        total_T = x_TKD.new_zeros(x_TKD.shape[:-2])
        for j in range(top_k):
            for k in range(j + 1, top_k):
                dot_T = (xs[j] * xs[k]).sum(-1)
                total_T = total_T + dot_T * dot_T * (scale[j] + scale[k])
        return total_T
    gram_TKK = torch.matmul(x_TKD, x_TKD.transpose(-1, -2))
    sq_norm_TK = torch.diagonal(gram_TKK, dim1=-2, dim2=-1)
    scale_TK = sq_norm_TK / (sq_norm_TK + ORTHO_EPS) ** 2
    pair_TKK = gram_TKK * gram_TKK * scale_TK.unsqueeze(-2)
    off_diag_KK = ~torch.eye(top_k, dtype=torch.bool, device=x_TKD.device)
    return torch.where(off_diag_KK, pair_TKK, 0.0).sum((-1, -2))


_PAIRWISE_MAX_K = 4


def orthogonality_loss_sum(
    expert_out_TKD: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over valid tokens and ordered pairs, count = K * valid tokens), both 0-dim tensors."""
    per_token_T = orthogonality_per_token(expert_out_TKD)
    if token_mask_T is None:
        num_pairs = float(per_token_T.numel() * expert_out_TKD.shape[-2])
        count = as_scalar(num_pairs, per_token_T)
        return per_token_T.sum(), count
    valid_T = _valid(token_mask_T, per_token_T)
    total = torch.where(valid_T, per_token_T, 0.0).sum()
    count = valid_T.sum().to(total.dtype) * expert_out_TKD.shape[-2]
    return total, count


def orthogonality_loss(
    expert_out_TKD: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """L_ortho = sum_t sum_{j != k} ||proj_{x_k} x_j||^2 / (K * T) (method §2.9).

    ``normalizer`` replaces the local K * T (pass the global K * T for micro-batching).
    """
    total, count = orthogonality_loss_sum(expert_out_TKD, token_mask_T)
    return normalized(total, count, normalizer)


class _GatedSumOrthogonality(torch.autograd.Function):
    """(sum_k g_k x_k, sum_t orthogonality_per_token(x)) with a hand-written backward: norms and
    dots by `vector_norm` / `vecdot` (no [T, K, D] temporaries), the gradient written per slot by
    fused multiply-adds. Pairwise form; K <= _PAIRWISE_MAX_K, float32/64 (the caller checks)."""

    @staticmethod
    def forward(ctx, x_TKD, gates_TK, weight_T):
        top_k = x_TKD.shape[-2]
        xs, gs = x_TKD.unbind(-2), gates_TK.unbind(-1)
        sq_norm_TK = torch.linalg.vector_norm(x_TKD, dim=-1).square()
        inv_TK = (sq_norm_TK + ORTHO_EPS).reciprocal()
        scale_TK = sq_norm_TK * inv_TK * inv_TK  # n / (n + eps)^2
        pairs = [(j, k) for j in range(top_k) for k in range(j + 1, top_k)]
        dot_TP = torch.stack([torch.linalg.vecdot(xs[j], xs[k]) for j, k in pairs], -1)
        pair_scale_TP = torch.stack([scale_TK[..., j] + scale_TK[..., k] for j, k in pairs], -1)
        if weight_T is not None:  # token weights (the response mask) enter as a per-token factor
            pair_scale_TP = pair_scale_TP * weight_T.unsqueeze(-1)
        total = (dot_TP * dot_TP * pair_scale_TP).sum()
        y_TD = xs[0] * gs[0].unsqueeze(-1)
        for k in range(1, top_k):
            y_TD.addcmul_(xs[k], gs[k].unsqueeze(-1))
        ctx.save_for_backward(x_TKD, gates_TK, sq_norm_TK, inv_TK, dot_TP, pair_scale_TP, weight_T)
        return y_TD, total

    @staticmethod
    def backward(ctx, grad_y_TD, grad_total):
        x_TKD, gates_TK, sq_norm_TK, inv_TK, dot_TP, pair_scale_TP, weight_T = ctx.saved_tensors
        top_k = x_TKD.shape[-2]
        xs = x_TKD.unbind(-2)
        pairs = [(j, k) for j in range(top_k) for k in range(j + 1, top_k)]
        grad_gates_TK = torch.stack([torch.linalg.vecdot(grad_y_TD, x_TD) for x_TD in xs], -1)
        partner_TP = 2.0 * grad_total * dot_TP * pair_scale_TP  # coefficient of the other vector
        dscale_TK = (ORTHO_EPS - sq_norm_TK) * inv_TK * inv_TK * inv_TK  # d(n/(n+eps)^2)/dn
        sq_dot_TP = dot_TP * dot_TP
        own = [sum(sq_dot_TP[..., q] for q, pair in enumerate(pairs) if k in pair)
               for k in range(top_k)]  # sum of squared dots over each slot's pairs
        self_TK = 2.0 * grad_total * dscale_TK * torch.stack(own, -1)
        if weight_T is not None:
            self_TK = self_TK * weight_T.unsqueeze(-1)
        grad_TKD = x_TKD * self_TK.unsqueeze(-1)
        grad_TKD.addcmul_(grad_y_TD.unsqueeze(-2), gates_TK.unsqueeze(-1))
        gs = grad_TKD.unbind(-2)  # views: the pair terms are added in place
        for q, (j, k) in enumerate(pairs):
            gs[j].addcmul_(xs[k], partner_TP[..., q:q + 1])
            gs[k].addcmul_(xs[j], partner_TP[..., q:q + 1])
        return grad_TKD, grad_gates_TK, None


def orthogonality_cosine_per_token(expert_out_TKD: torch.Tensor) -> torch.Tensor:
    """Scale-invariant form (OURS): per-token sum over ordered top-k pairs j != k of the squared
    cosine cos^2(x_j, x_k) = <x_j, x_k>^2 / ((||x_j||^2 + eps)(||x_k||^2 + eps)) -> [T],
    in [0, K(K-1)].

    Why: docs/method.md's projection form equals <x_j, x_k>^2 (1/||x_j||^2 + 1/||x_k||^2), which
    grows
    with the square of the output norms, so one coefficient cannot suit models (or training phases)
    whose expert outputs differ in scale; the cosine form measures only the angle."""
    x_TKD = expert_out_TKD.to(torch.promote_types(expert_out_TKD.dtype, torch.float32))
    gram_TKK = torch.matmul(x_TKD, x_TKD.transpose(-1, -2))
    inv_TK = 1.0 / (torch.diagonal(gram_TKK, dim1=-2, dim2=-1) + ORTHO_EPS)
    cos2_TKK = gram_TKK * gram_TKK * inv_TK.unsqueeze(-1) * inv_TK.unsqueeze(-2)
    off_diag_KK = ~torch.eye(x_TKD.shape[-2], dtype=torch.bool, device=x_TKD.device)
    return torch.where(off_diag_KK, cos2_TKK, 0.0).sum((-1, -2))


ORTHO_FORMS = ("projection", "cosine")


def gated_sum_and_orthogonality(
    expert_out_TKD: torch.Tensor,
    gates_TK: torch.Tensor,
    token_weight_T: torch.Tensor | None = None,
    form: str = "projection",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = sum_k g_k x_k [T, D], orthogonality sum over tokens and ordered pairs): the MoE output
    formed from the raw per-slot outputs and the ortho loss's numerator (method §2.9) in one pass
    each way (`_GatedSumOrthogonality`) for K <= 4 in float32/64; composite otherwise.
    ``token_weight_T`` (0/1: the response mask, method §2.9) weights each token's term in the sum.
    ``form``: "projection" (method §2.9) or "cosine" (`orthogonality_cosine_per_token`,
    composite)."""
    if form not in ORTHO_FORMS:
        raise ValueError(f"form must be one of {{{', '.join(ORTHO_FORMS)}}} (got {form!r})")
    fused = (form == "projection" and 2 <= expert_out_TKD.shape[-2] <= _PAIRWISE_MAX_K
             and expert_out_TKD.dim() == 3
             and expert_out_TKD.dtype in (torch.float32, torch.float64))
    weight_T = None if token_weight_T is None else token_weight_T.to(expert_out_TKD.dtype)
    if fused:
        gates_TK = gates_TK.to(expert_out_TKD.dtype)
        return _GatedSumOrthogonality.apply(expert_out_TKD, gates_TK, weight_T)
    y_TD = (expert_out_TKD * gates_TK.to(expert_out_TKD.dtype).unsqueeze(-1)).sum(-2)
    per_token = orthogonality_cosine_per_token if form == "cosine" else orthogonality_per_token
    per_token_T = per_token(expert_out_TKD)
    return y_TD, (per_token_T if weight_T is None else per_token_T * weight_T).sum()


def routing_variance_loss_sum(
    probs_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(-sum_t Var_e(p[t, :]) over valid tokens, count = valid tokens); unbiased variance."""
    probs_TE = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32))
    # Two-pass centred variance by hand: torch.var's Welford kernel is ~5x slower on short rows.
    centred_TE = probs_TE - probs_TE.mean(-1, keepdim=True)
    var_T = (centred_TE * centred_TE).sum(-1) / (probs_TE.shape[-1] - 1)
    if token_mask_T is None:
        count = as_scalar(float(var_T.numel()), var_T)
        return -var_T.sum(), count
    valid_T = _valid(token_mask_T, var_T)
    total = -torch.where(valid_T, var_T, 0.0).sum()
    return total, valid_T.sum().to(total.dtype)


def routing_variance_loss_sum_from_logits(
    logits_TE: torch.Tensor, token_weight_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`routing_variance_loss_sum` of p = softmax(logits) over all tokens (or the tokens of the
    0/1 ``token_weight_T``: count = their number), by the identity sum_e p_e = 1:
    Var_e(p) = (sum_e p_e^2 - 1/E) / (E - 1)  (3 ops on [T, E] instead of 7; the gradient w.r.t.
    the logits is the same, since softmax's Jacobian annihilates the per-row constant the
    centring adds)."""
    dtype = torch.promote_types(logits_TE.dtype, torch.float32)
    probs_TE = torch.softmax(logits_TE.to(dtype), dim=-1)
    num_experts = probs_TE.shape[-1]
    if token_weight_T is None:
        num_tokens = probs_TE.numel() // num_experts
        total = -((probs_TE * probs_TE).sum() - num_tokens / num_experts) / (num_experts - 1)
        return total, as_scalar(float(num_tokens), total)
    weight_T = token_weight_T.to(dtype).reshape(-1)
    sq_T = (probs_TE * probs_TE).sum(-1).reshape(-1)
    total = -((sq_T - 1.0 / num_experts) * weight_T).sum() / (num_experts - 1)
    return total, weight_T.sum()


def routing_variance_loss(
    probs_TE: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """L_var = -mean_t Var_e(p[t, e]) (method §2.9); ``normalizer`` replaces the local token
    count."""
    total, count = routing_variance_loss_sum(probs_TE, token_mask_T)
    return normalized(total, count, normalizer)

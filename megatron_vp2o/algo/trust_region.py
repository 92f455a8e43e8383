"""Trust region of VP2O: anchor prototype budget, behaviour budget, ESS and the refresh rule.

What (OURS, method §2.10-2.12). VP2O drops PPO clipping; proximity to the behaviour policy is kept
by
two budgets checked after every learner step on the same rollout buffer:
- Anchor budget (2.10): routing barycenters b(t) = sum_{e in topk(t)} g[t, e] s_e u_e of the
  learner versus b_anc(t) of the actors at the last refresh (anchor prototypes, logged gates);
  D_anc = mean_{layers, tokens} ||b - b_anc|| in [0, 2], accept iff D_anc <= delta_anc. On a
  violation: backtrack the parameter change by 1/2, 1/4, 1/8, else restore and refresh.
- Behaviour budget (2.11): D_beh = mean_t (rho_t - 1 - log rho_t) (k3 estimate of KL(mu || pi)) and
  the tempered, normalised effective sample size of the importance weights.
- Refresh rule (2.12, eq. 11): refresh iff D_beh > delta_drift or ESS < eta_ess or the anchor
  budget failed or steps since refresh >= max_steps_per_refresh. ``refresh_reason`` decides it once
  and names the first violated condition (a code into ``REASONS``); ``refresh_needed`` is its
  ``!= NO_REFRESH``, so the decision and its name cannot disagree.
Why pure tensors: every statistic comes out as a device tensor (no host sync); the ``*_sum``
variants return (sum, count) so ranks and layers can all-reduce before dividing, and every rank
then takes the same decision. Decisions are int64 codes (ACCEPT, BACKTRACK, REJECT, REFRESH).

Departures: gates are renormalised over the top-k here (a no-op for routers that already do);
a non-finite D_anc compares False against the budget, so a NaN step is backtracked and then
rejected like any violation. k3 uses expm1 for accuracy near rho = 1.

Shape legend: T tokens, K top-k, E experts, D hidden, B sequences, N sequences (or tokens) in the
ESS, optional leading L (layers) on routing tensors.
"""

from __future__ import annotations

import torch

from .scalars import as_scalar
from .stein import gather_mix

ACCEPT, BACKTRACK, REJECT, REFRESH = 0, 1, 2, 3
DECISION_NAMES = ("accept", "backtrack", "reject", "refresh")
ON_VIOLATION = ("backtrack", "reject", "refresh")
NO_REFRESH, REFRESH_ANCHOR, REFRESH_DRIFT, REFRESH_ESS, REFRESH_MAX_STEPS = 0, 1, 2, 3, 4
REASONS = ("none", "anchor", "drift", "ess", "max_steps")  # refresh_reason codes, by precedence


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return mask.to(torch.bool)


def _ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp_min(1.0)


def prototype_signs(protos_ED: torch.Tensor, anchor_protos_ED: torch.Tensor) -> torch.Tensor:
    """s_e = sign(u_e . u_anc[e]) in {-1, +1} (0 -> +1) (method §2.10), [..., E]."""
    dot_E = (protos_ED * anchor_protos_ED.to(protos_ED.dtype)).sum(-1)
    return torch.where(dot_E < 0, -1.0, 1.0).to(protos_ED.dtype)


def barycenters(
    topk_idx_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    protos_ED: torch.Tensor,
    signs_E: torch.Tensor | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """b(t) = sum_{e in topk(t)} g[t, e] s_e u_e (method §2.10): [..., T, D].

    Inputs: top-k indices and gates [..., T, K], prototypes [..., E, D], signs [..., E] (default
    +1). Gates are renormalised over the top-k unless ``renormalize=False``.
    """
    if signs_E is not None:
        protos_ED = protos_ED * signs_E.to(protos_ED.dtype).unsqueeze(-1)
    gates_TK = gates_TK.to(protos_ED.dtype)
    if renormalize:
        gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return gather_mix(protos_ED, topk_idx_TK.long(), gates_TK)


def anchor_distance_sum(
    topk_idx_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    protos_ED: torch.Tensor,
    anchor_topk_idx_TK: torch.Tensor,
    anchor_gates_TK: torch.Tensor,
    anchor_protos_ED: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over layers and valid tokens of ||b(t) - b_anc(t)||, count) (method §2.10).

    Learner prototypes are sign-aligned to the anchor (s_e). Leading layer dims are summed too.
    """
    signs_E = prototype_signs(protos_ED, anchor_protos_ED)
    bary_TD = barycenters(topk_idx_TK, gates_TK, protos_ED, signs_E)
    anchor_TD = barycenters(anchor_topk_idx_TK, anchor_gates_TK, anchor_protos_ED.to(bary_TD.dtype))
    dist_T = torch.linalg.vector_norm(bary_TD - anchor_TD, dim=-1)
    valid_T = _valid(token_mask_T, dist_T).expand(dist_T.shape)
    total = torch.where(valid_T, dist_T, 0.0).sum()
    return total, valid_T.sum().to(total.dtype)


def anchor_distance(
    topk_idx_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    protos_ED: torch.Tensor,
    anchor_topk_idx_TK: torch.Tensor,
    anchor_gates_TK: torch.Tensor,
    anchor_protos_ED: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """D_anc = mean over layers and tokens of ||b - b_anc|| in [0, 2] (method §2.10).

    ``normalizer`` replaces the local (layers x tokens) count with the global one.
    """
    total, count = anchor_distance_sum(
        topk_idx_TK, gates_TK, protos_ED, anchor_topk_idx_TK, anchor_gates_TK, anchor_protos_ED,
        token_mask_T,
    )
    return _ratio(total, count if normalizer is None else as_scalar(normalizer, total))


def behaviour_drift_sum(
    logp_T: torch.Tensor, logp_old_T: torch.Tensor, mask_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t (rho_t - 1 - log rho_t), count) over valid tokens, rho = exp(logp - logp_old)."""
    logratio_T = (logp_T - logp_old_T).to(torch.promote_types(logp_T.dtype, torch.float32))
    k3_T = torch.expm1(logratio_T) - logratio_T
    valid_T = _valid(mask_T, k3_T)
    total = torch.where(valid_T, k3_T, 0.0).sum()
    return total, valid_T.sum().to(total.dtype)


def behaviour_drift(
    logp_T: torch.Tensor,
    logp_old_T: torch.Tensor,
    mask_T: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """D_beh = mean_t (rho_t - 1 - log rho_t), the k3 estimate of KL(mu || pi) (method §2.11)."""
    total, count = behaviour_drift_sum(logp_T, logp_old_T, mask_T)
    return _ratio(total, count if normalizer is None else as_scalar(normalizer, total))


def sequence_logratio(
    logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """log rho(y_b) = sum_{t in y_b} (logp - logp_old) over valid tokens -> [B]."""
    logratio_BT = (logp_BT - logp_old_BT).to(torch.promote_types(logp_BT.dtype, torch.float32))
    return torch.where(mask_BT.to(torch.bool), logratio_BT, 0.0).sum(-1)


def tempered_ess(
    logratio_seq_N: torch.Tensor, kappa: float, mask_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised ESS in (0, 1] of w_n = exp(kappa log rho_n) (method §2.11).

    ESS/n = exp(2 logsumexp(log w) - logsumexp(2 log w)) / n over valid entries; 1 if none valid.
    Leading dims are independent batches (one ESS each).
    """
    log_w_N = kappa * logratio_seq_N.to(torch.promote_types(logratio_seq_N.dtype, torch.float32))
    valid_N = _valid(mask_N, log_w_N)
    log_w_N = torch.where(valid_N, log_w_N, float("-inf"))
    count = valid_N.sum(-1).to(log_w_N.dtype)
    shifted_N = log_w_N - log_w_N.amax(-1, keepdim=True).clamp_min(-1e30)  # the max cancels
    log_ess = 2.0 * torch.logsumexp(shifted_N, -1) - torch.logsumexp(2.0 * shifted_N, -1)
    ess = torch.exp(log_ess) / count.clamp_min(1.0)
    return torch.where(count > 0, ess.clamp(max=1.0), 1.0)


def behaviour_ess(
    logp_BT: torch.Tensor,
    logp_old_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kappa: float,
    level: str = "sequence",
) -> torch.Tensor:
    """Tempered normalised ESS at ``level`` "sequence" (a weight per y_b) or "token" (method
    §2.11)."""
    if level == "sequence":
        seq_mask_B = mask_BT.to(torch.bool).any(-1)
        return tempered_ess(sequence_logratio(logp_BT, logp_old_BT, mask_BT), kappa, seq_mask_B)
    if level == "token":
        logratio_N = (logp_BT - logp_old_BT).reshape(-1)
        return tempered_ess(logratio_N, kappa, mask_BT.reshape(-1))
    raise ValueError(f"ess_level must be one of {{sequence, token}} (got {level!r})")


def refresh_reason(
    drift: torch.Tensor | float,
    ess: torch.Tensor | float,
    anchor_failed: torch.Tensor | bool,
    steps_since_refresh: torch.Tensor | int,
    *,
    drift_delta: float = 0.02,
    ess_min: float = 0.5,
    max_steps_per_refresh: int = 8,
) -> torch.Tensor:
    """The refresh rule (method §2.12, eq. 11) with its reason: an int64 code into ``REASONS``.

    NO_REFRESH when every budget holds, else the first violated condition in the order anchor
    failed, D_beh > delta, ESS < eta, steps >= max. A NaN drift or ESS counts as a violation.
    Static shapes, no host read: the caller reads the code once.
    """
    drift = torch.as_tensor(drift)
    ess = as_scalar(ess, drift)
    steps = as_scalar(steps_since_refresh, drift, torch.int64)
    failed = as_scalar(anchor_failed, drift, torch.bool)
    drift_ok, ess_ok = drift <= drift_delta, ess >= ess_min  # NaN statistics fail these
    code = torch.where(steps >= max_steps_per_refresh, REFRESH_MAX_STEPS, NO_REFRESH)
    code = torch.where(ess_ok, code, REFRESH_ESS)
    code = torch.where(drift_ok, code, REFRESH_DRIFT)
    return torch.where(failed, REFRESH_ANCHOR, code).to(torch.int64)


def refresh_needed(
    drift: torch.Tensor | float,
    ess: torch.Tensor | float,
    anchor_failed: torch.Tensor | bool,
    steps_since_refresh: torch.Tensor | int,
    *,
    drift_delta: float = 0.02,
    ess_min: float = 0.5,
    max_steps_per_refresh: int = 8,
) -> torch.Tensor:
    """Refresh iff D_beh > delta or ESS < eta or anchor failed or steps >= max (method §2.12): bool.

    ``refresh_reason(...) != NO_REFRESH``; a NaN drift or ESS counts as a violation.
    """
    code = refresh_reason(drift, ess, anchor_failed, steps_since_refresh, drift_delta=drift_delta,
                          ess_min=ess_min, max_steps_per_refresh=max_steps_per_refresh)
    return code != NO_REFRESH


def backtrack_scales(num_scales: int = 3) -> tuple[float, ...]:
    """The backtracking schedule 1/2, 1/4, 1/8, ... (method §2.10), ``num_scales`` entries."""
    return tuple(0.5 ** (i + 1) for i in range(num_scales))


def scaled_update(
    before_P: torch.Tensor, after_P: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """before + scale * (after - before): the parameter change scaled by ``scale`` (method
    §2.10)."""
    return torch.lerp(before_P, after_P.to(before_P.dtype), scale)


def decide(
    anchor_ok: torch.Tensor,
    attempt: torch.Tensor | int,
    on_violation: str = "backtrack",
    num_scales: int = 3,
) -> torch.Tensor:
    """Step decision code (int64 0-dim tensor) after evaluating the anchor budget (method §2.10).

    ``attempt`` counts backtracks already made (0 = the full step). ACCEPT if the budget holds;
    otherwise by ``on_violation``: backtrack -> BACKTRACK while attempt < num_scales, then REJECT;
    reject -> REJECT (restore, refresh); refresh -> REFRESH (keep the step, refresh).
    """
    ok = torch.as_tensor(anchor_ok).to(torch.bool)
    attempt = as_scalar(attempt, ok, torch.int64)
    if on_violation == "backtrack":
        failed = torch.where(attempt < num_scales, BACKTRACK, REJECT)
    elif on_violation == "reject":
        failed = torch.full_like(attempt, REJECT)
    elif on_violation == "refresh":
        failed = torch.full_like(attempt, REFRESH)
    else:
        raise ValueError(f"on_violation must be one of {{{', '.join(ON_VIOLATION)}}}")
    return torch.where(ok, ACCEPT, failed).to(torch.int64)


def forces_refresh(decision: torch.Tensor) -> torch.Tensor:
    """True where the decision forces an actor refresh (REJECT or REFRESH): the anchor failed."""
    return (decision == REJECT) | (decision == REFRESH)

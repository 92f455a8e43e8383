"""Group advantages and the policy-gradient surrogate losses of GRPO and VP2O (method §2.2, 2.3).

What:
- Advantage estimators (registry ``ADVANTAGES``), rewards of G responses per prompt -> [B, G]:
  ``grpo`` A_i = (r_i - mean r) / (std r + eps) with the unbiased std (STANDARD, DeepSeekMath; as
  verl and TRL); ``dr_grpo`` A_i = r_i - mean r (Liu et al. 2025, no std division); ``rloo``
  A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean r) (Ahmadian et al. 2024). A group whose
  rewards are all equal gets A = 0 exactly (and so does a group of one).
- Policy losses (registry ``POLICY_LOSSES``): per-token term
  min(rho A, clip(rho, 1-eps, 1+eps) A) - beta_kl k3(pi_ref, pi), rho = exp(logpi - logmu).
  ``grpo_clip`` clips with eps (0.2 when None); ``vp2o`` does not clip unless eps is given
  (ablation): VP2O controls proximity with the trust region instead (method §2.10-2.12).
- Aggregations (registry ``AGGREGATIONS``): ``seq_mean_token_mean`` (method §2.2 default:
  1/B sum_b 1/|o_b| sum_t) and ``token_mean`` (sum over tokens / number of tokens).
Global normalisation (CONTRIBUTING.md §9): `aggregation_count` gives the local denominator; sum it
over micro-batches and data-parallel ranks and pass it as ``normalizer`` so that summing the
micro-batch losses gives the global mean.

Departures: k3(pi_ref, pi) = exp(lr) - lr - 1 with lr = logp_ref - logp (Schulman's k3, as in
DeepSeekMath). Masked token positions are zeroed before exp, so padding never produces NaN
gradients. In seq_mean_token_mean a sequence with no valid token is not counted in B.

Shape legend: B sequences (micro-batch rows; B prompts in [B, G] rewards), G group size,
T tokens per sequence (padded).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from .scalars import as_scalar

from .registry import Registry

ADVANTAGES: Registry[Callable[..., torch.Tensor]] = Registry("advantage estimator")
AGGREGATIONS: Registry[Callable[..., torch.Tensor]] = Registry("loss aggregation")
POLICY_LOSSES: Registry[Callable[..., tuple]] = Registry("policy loss")


def _degenerate(rewards_BG: torch.Tensor) -> torch.Tensor:
    """[B, 1] True where every reward in the group is equal (exactly)."""
    return rewards_BG.amax(-1, keepdim=True) == rewards_BG.amin(-1, keepdim=True)


@ADVANTAGES.register("grpo")
def group_advantages(rewards_BG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = (r - mean r) / (std_unbiased r + eps) per group; 0 for an all-equal group (method
    §2.2)."""
    rewards_BG = rewards_BG.to(torch.promote_types(rewards_BG.dtype, torch.float32))
    centred_BG = rewards_BG - rewards_BG.mean(-1, keepdim=True)
    group = rewards_BG.shape[-1]
    std_B1 = (centred_BG.square().sum(-1, keepdim=True) / max(group - 1, 1)).sqrt()  # unbiased
    return torch.where(_degenerate(rewards_BG), 0.0, centred_BG / (std_B1 + eps))


@ADVANTAGES.register("dr_grpo")
def dr_grpo_advantages(rewards_BG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = r - mean r (Dr. GRPO: no std normalisation); ``eps`` unused."""
    rewards_BG = rewards_BG.to(torch.promote_types(rewards_BG.dtype, torch.float32))
    centred_BG = rewards_BG - rewards_BG.mean(-1, keepdim=True)
    return torch.where(_degenerate(rewards_BG), 0.0, centred_BG)


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards_BG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean r) (leave-one-out); ``eps`` unused."""
    group = rewards_BG.shape[-1]
    return dr_grpo_advantages(rewards_BG) * (group / max(group - 1, 1))


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer=None
) -> torch.Tensor:
    """1/B sum_b (1/|o_b|) sum_t v[b, t]; B = sequences with a valid token, or ``normalizer``."""
    mask_BT = mask_BT.to(torch.bool)
    tokens_B = mask_BT.sum(-1).to(values_BT.dtype)
    seq_mean_B = torch.where(mask_BT, values_BT, 0.0).sum(-1) / tokens_B.clamp_min(1.0)
    return seq_mean_B.sum() / _denominator(mask_BT, "seq_mean_token_mean", normalizer, values_BT)


@AGGREGATIONS.register("token_mean")
def token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer=None) -> torch.Tensor:
    """sum_{b, t} v[b, t] / (number of valid tokens, or ``normalizer``)."""
    mask_BT = mask_BT.to(torch.bool)
    total = torch.where(mask_BT, values_BT, 0.0).sum()
    return total / _denominator(mask_BT, "token_mean", normalizer, values_BT)


def aggregation_count(mask_BT: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Local denominator of ``aggregation``: sequences with a valid token, or valid tokens."""
    AGGREGATIONS.get(aggregation)
    mask_BT = mask_BT.to(torch.bool)
    if aggregation == "seq_mean_token_mean":
        return mask_BT.any(-1).sum()
    return mask_BT.sum()


def _denominator(mask_BT, aggregation, normalizer, like) -> torch.Tensor:
    count = aggregation_count(mask_BT, aggregation) if normalizer is None else normalizer
    return as_scalar(count, like).clamp_min(1.0)


def _masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    total = torch.where(mask_BT, values_BT, 0.0).sum()
    return total / mask_BT.sum().to(total.dtype).clamp_min(1.0)


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    kl_coef: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    aggregation: str = "seq_mean_token_mean",
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss = -agg_t [min(rho A, clip(rho, 1 +- eps) A) - kl_coef k3(pi_ref, pi)] (method §2.3).

    Shapes: logp, logp_old, logp_ref, mask [B, T]; ``advantages`` [B] (one per sequence) or
    [B, T]. ``clip_eps=None`` disables clipping. ``normalizer`` is the global denominator of the
    aggregation (see `aggregation_count`). Metrics (0-dim tensors, local token means): pg_loss,
    kl_ref, clip_frac, ratio_mean, ratio_max, behaviour_kl (k3 of KL(mu || pi)).
    """
    logp_BT, logp_old_BT, mask_BT = logp, logp_old, mask
    mask_BT = mask_BT.to(torch.bool)
    adv_BT = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    logratio_BT = torch.where(mask_BT, logp_BT - logp_old_BT, 0.0)
    ratio_BT = torch.exp(logratio_BT)
    surrogate_BT = ratio_BT * adv_BT
    clipped_BT = torch.zeros_like(mask_BT)
    if clip_eps is not None:
        clipped_surrogate_BT = torch.clamp(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps) * adv_BT
        clipped_BT = clipped_surrogate_BT < surrogate_BT
        surrogate_BT = torch.minimum(surrogate_BT, clipped_surrogate_BT)
    kl_BT = torch.zeros_like(surrogate_BT)
    if logp_ref is not None:
        ref_logratio_BT = torch.where(mask_BT, logp_ref - logp_BT, 0.0)
        kl_BT = torch.expm1(ref_logratio_BT) - ref_logratio_BT
    elif kl_coef != 0.0:
        raise ValueError("policy_loss: kl_coef != 0 needs logp_ref")
    aggregate = AGGREGATIONS.get(aggregation)
    pg_loss = aggregate(-surrogate_BT, mask_BT, normalizer)
    loss = pg_loss
    if kl_coef != 0.0:
        loss = loss + kl_coef * aggregate(kl_BT, mask_BT, normalizer)
    detached_ratio_BT, detached_lr_BT = ratio_BT.detach(), logratio_BT.detach()
    metrics = {
        "pg_loss": pg_loss.detach(),
        "kl_ref": _masked_mean(kl_BT.detach(), mask_BT),
        "clip_frac": _masked_mean(clipped_BT.to(ratio_BT.dtype), mask_BT),
        "ratio_mean": _masked_mean(detached_ratio_BT, mask_BT),
        "ratio_max": torch.where(mask_BT, detached_ratio_BT, 0.0).amax(),
        "behaviour_kl": _masked_mean(torch.expm1(detached_lr_BT) - detached_lr_BT, mask_BT),
    }
    return loss, metrics


@POLICY_LOSSES.register("grpo_clip")
def grpo_clip_loss(*args, clip_eps: float | None = None, **kwargs):
    """GRPO baseline: `policy_loss` with PPO clipping, eps = 0.2 when None (method §2.3)."""
    return policy_loss(*args, clip_eps=0.2 if clip_eps is None else clip_eps, **kwargs)


@POLICY_LOSSES.register("vp2o")
def vp2o_loss(*args, clip_eps: float | None = None, **kwargs):
    """VP2O: `policy_loss` without clipping unless ``clip_eps`` is given (ablation) (method
    §2.3)."""
    return policy_loss(*args, clip_eps=clip_eps, **kwargs)

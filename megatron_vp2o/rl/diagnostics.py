"""Routing and expert diagnostics of an evaluation batch, the same for VP2O and GRPO runs.

The VP2O learner logs its own ``moe/*`` statistics, but a GRPO run uses megatron's plain MoE layer
and logs none, so comparisons read these instead (``eval/*``, response tokens only):
- ``eval/router_entropy``: mean over layers and response tokens of H(softmax(router logits)) in nats
  (from a teacher-forced pass over the eval rollouts; a forward pre-hook on each router takes its
  input and forms the logits with the router's own weight);
- ``eval/expert_util``: normalised entropy of the top-k expert load over response tokens, mean over
  layers (1: every expert equally loaded; 0: one expert takes all), from the rollout's routing log;
- ``eval/proto_overlap``: mean off-diagonal |u_i . u_j| of expert prototypes (top left singular
  vectors of fc2, 30 power steps from the fixed start, method §2.4), mean over layers -- recomputed
  from the weights, so VP2O's tracked prototypes and GRPO's untracked experts are measured alike.
  Needs every expert on the rank (EP = 1 and no expert-TP); otherwise not reported.

Shape legend: L MoE layers, B sequences, T response tokens, K top-k, E experts, D hidden, F ffn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from megatron_vp2o.algo import diagnostics, prototypes
from megatron_vp2o.moe.experts import ExpertAccessor


def expert_util(topk_idx_LBTK: torch.Tensor, mask_BT: torch.Tensor, num_experts: int) -> float:
    """Normalised entropy of each layer's expert load over the masked tokens, mean over layers."""
    keep_BTK = mask_BT.bool().unsqueeze(-1).expand(topk_idx_LBTK.shape[1:])
    scores = []
    for idx_BTK in topk_idx_LBTK:
        load_E = torch.bincount(idx_BTK[keep_BTK].reshape(-1).long().cpu(), minlength=num_experts).double()
        share_E = load_E / load_E.sum().clamp_min(1.0)
        entropy = -(share_E * share_E.clamp_min(1e-30).log()).sum()
        scores.append(float(entropy) / math.log(num_experts))
    return sum(scores) / max(len(scores), 1)


@torch.no_grad()
def router_entropy(model, rollouts) -> float:
    """Mean router entropy over MoE layers and response tokens of a teacher-forced pass."""
    from megatron_vp2o.generation import teacher_forced_logprobs

    probs, handles = [], []

    def hook(router, args):
        logits_TE = F.linear(args[0].reshape(-1, args[0].shape[-1]).to(router.weight.dtype), router.weight)
        probs.append(torch.softmax(logits_TE.float(), dim=-1))

    for module in model.modules():
        if isinstance(module, TopKRouter):
            handles.append(module.register_forward_pre_hook(hook))
    try:
        teacher_forced_logprobs(model, rollouts)
    finally:
        for h in handles:
            h.remove()
    if not probs:
        return float("nan")
    tf = rollouts.training_input()
    mask_T = tf.loss_mask_BS.t().reshape(-1).to(probs[0].device)  # layers route [S, B] sequence-major
    per_layer = [float(diagnostics.router_entropy(p_TE, mask_T)) for p_TE in probs if p_TE.shape[0] == mask_T.numel()]
    return sum(per_layer) / max(len(per_layer), 1)


@torch.no_grad()
def prototype_overlap(model) -> float | None:
    """Mean over MoE layers of the prototypes' mean off-diagonal |cosine| (None without all experts)."""
    if ps.get_expert_model_parallel_world_size() > 1 or ps.get_expert_tensor_parallel_world_size() > 1:
        return None
    values = []
    for module in model.modules():
        if isinstance(module, MoELayer):
            weight_EDF = ExpertAccessor(module.experts, module.config.hidden_size).fc2_weight_XDF().float()
            values.append(float(diagnostics.prototype_overlap(prototypes.init_prototypes(weight_EDF))))
    return sum(values) / len(values) if values else None


def eval_diagnostics(model, rollouts, num_experts: int) -> dict:
    out = {"eval/router_entropy": router_entropy(model, rollouts),
           "eval/expert_util": expert_util(rollouts.topk_idx_LBTK, rollouts.response_mask_BT, num_experts)}
    overlap = prototype_overlap(model)
    if overlap is not None:
        out["eval/proto_overlap"] = overlap
    return out

"""The plan's VP2O-only rows: prototypes, Stein buffers, routing records (0 for GRPO).

Each formula follows what the code allocates for one rank, from the config's shapes alone; the
live check (:mod:`.live`, ``vp2o plan --check``) measures the same bytes on a real learner step.

* ``prototypes`` (fp32, per MoE layer of the stage): the layer buffers ``protos_XD``, ``protos_ED``,
  ``counts_EE`` (``moe/layer.py``); with the anchor budget (``vp2o.trust_region.enabled`` and
  ``rl.ablate.anchor_budget``) the anchor's prototypes ``E x D`` (``capture_anchors``), the trust
  region's old prototypes ``X x D`` (restored on a backtrack or reject) and, with
  ``anchor_gates: post_step``, the re-route's copy of ``counts_EE`` (``route_after_step``).
* ``stein``: the most the Stein hook (``distributed/stein_hook.py``) holds at once, the larger of
  two moments. Repulsion (``repulsion_coef > 0``), one layer at a time: the fp32 gather buffer of
  one layer's local expert gradients, that layer's fc2 weights stacked ``[X, D, F]`` where the
  layout is not megatron's GroupedMLP (whose weights are viewed) and their fp32 copy under bf16
  parameters. Transport, one layer and column block (fc1 ``[X, P1]``, then fc2 ``[X, P2]``) at a
  time: the buffer, the previous layer's outputs (held until the next layer's replace them), the
  earlier block's output, the block's output and its ``output - raw`` norm temporary, and with
  EP > 1 the static-shape neighbour exchange ``[ep, X, P_block]`` (send and receive). Plus the
  stacked prototypes and counts ``[L, E, D]``, ``[L, E, E]``. The prototype refresh after the
  optimizer step holds one layer's fp32 fc2 copy, less than this row.
* ``routing`` (held between steps: through the next rollouts): with the anchor budget, the
  anchor's routing and the step's routing captures, each per token of the step (or of its first
  ``anchor_micro_batches``) and MoE layer top-k
  ids (int64), gates (router dtype) and a counted flag (bool); the loss log (4 fp32) and, with Stein,
  the active set (E bools) per layer.
* ``routing_stats`` (during the forward/backward, with the activations): what a VP2O layer keeps
  of the step's micro-batches until the fold-in after the backward (``flush_step_stats``): each
  specialisation loss's value (one fp32 scalar per layer and micro-batch, folded in automatically
  every 128 values). The routing statistics (co-activation counts, router entropy) are folded into
  the layer's buffers by each micro-batch's forward (``moe/layer.py`` ``_fold_routing``); its
  temporaries (a few ``T_micro x E`` fp32 tensors of one layer, 6 MiB at 4096 tokens and 128
  experts) are freed before the next layer runs and are not a row.

Shape legend: L MoE layers of the stage, E experts, X local experts, D hidden, F expert ffn
(/ expert-TP), K top-k, T tokens of this rank in one step, P1 / P2 fc1 / fc2 elements per expert.
"""

from __future__ import annotations

import dataclasses
import math

_PENDING_LOSSES = 128  # loss values a VP2O layer keeps before folding in (moe/layer.py: 2 * _MAX_PENDING)
_BYTES = {"fp32": 4, "bf16": 2, "fp64": 8}


def vp2o_on(cfg) -> bool:
    return cfg.rl.algo == "vp2o" and cfg.vp2o.enabled


def knobs(cfg):
    """``cfg.vp2o`` with the ``rl.ablate`` switches applied, as the learner runs it (the RL session's
    mapping, docs/method.md §2.8: stein=false turns the transport off, repulsion=false sets alpha 0,
    specialization=false both loss coefficients 0)."""
    ab, v = cfg.rl.ablate, cfg.vp2o
    stein = dataclasses.replace(v.stein, enabled=v.stein.enabled and ab.stein,
                                repulsion_coef=v.stein.repulsion_coef if ab.repulsion else 0.0)
    spec = v.specialization if ab.specialization else dataclasses.replace(v.specialization, ortho_coef=0.0,
                                                                           var_coef=0.0)
    return dataclasses.replace(v, stein=stein, specialization=spec)


def anchor_budget(cfg) -> bool:
    """Whether the learner captures anchors and judges steps by them (method §2.10)."""
    return vp2o_on(cfg) and cfg.vp2o.trust_region.enabled and cfg.rl.ablate.anchor_budget


def router_bytes(model) -> int:
    return _BYTES[model.router.dtype or model.params_dtype]


def step_tokens(cfg, dp: int) -> int:
    """Tokens this rank's learner sees in one step: its sequences x ``model.seq_length``."""
    return math.ceil(cfg.rl.prompts_per_step * cfg.rl.policy_loss.group_size / dp) * cfg.model.seq_length


def anchor_tokens(cfg, dp: int) -> int:
    """Tokens the anchor and the step's captures hold per layer: the step's, or those of the first
    ``vp2o.trust_region.anchor_micro_batches`` micro-batches."""
    n = cfg.vp2o.trust_region.anchor_micro_batches
    if n == 0:
        return step_tokens(cfg, dp)
    return min(step_tokens(cfg, dp), n * cfg.rl.micro_batch_size * cfg.model.seq_length)


def prototype_bytes(cfg, moe_layers: int) -> int:
    if not vp2o_on(cfg):
        return 0
    model = cfg.model
    e, d, x = model.num_experts, model.hidden_size, model.num_experts // cfg.parallel.ep
    per_layer = x * d + e * d + e * e
    if anchor_budget(cfg):
        per_layer += e * d + x * d + (e * e if cfg.vp2o.trust_region.anchor_gates == "post_step" else 0)
    return 4 * moe_layers * per_layer


def _expert_shapes(cfg) -> tuple[int, int, int]:
    """(local experts X, fc1 elements P1, fc2 elements P2 per expert) of one MoE layer."""
    model, par = cfg.model, cfg.parallel
    f = model.moe_ffn_hidden_size // par.expert_tp
    gate = 2 if model.swiglu else 1
    return model.num_experts // par.ep, gate * f * model.hidden_size, f * model.hidden_size


def stein_bytes(cfg, moe_layers: int) -> int:
    """The Stein hook's peak (module docstring)."""
    stein = knobs(cfg).stein
    if not vp2o_on(cfg) or not stein.enabled or not moe_layers:
        return 0
    model, par = cfg.model, cfg.parallel
    x, p1, p2 = _expert_shapes(cfg)
    buffer = 4 * x * (p1 + p2)
    small = 4 * moe_layers * model.num_experts * (model.hidden_size + model.num_experts)
    # the previous layer's outputs live until the next layer's replace them (one batch of equal layers)
    peak, earlier = 0, (4 * x * (p1 + p2) if moe_layers > 1 else 0)
    for p_block in (p1, p2):
        out = 4 * x * p_block
        exchange = 2 * par.ep * out if par.ep > 1 else 0
        peak = max(peak, buffer + earlier + max(exchange, exchange // 2 + 2 * out))
        earlier += out
    if stein.repulsion_coef > 0:  # one layer's fc2 weights at a time
        pb = _BYTES[model.params_dtype]
        own = x * p2 * pb if model.expert_impl != "grouped" else 0  # GroupedMLP's weights are viewed
        upcast = x * p2 * 4 if pb != 4 else 0
        peak = max(peak, buffer + own + upcast)
    return peak + small


def routing_bytes(cfg, moe_layers: int, dp: int) -> int:
    """Routing records held between steps (module docstring)."""
    if not vp2o_on(cfg):
        return 0
    model = cfg.model
    per_layer = 16 + (model.num_experts if knobs(cfg).stein.enabled else 0)
    if anchor_budget(cfg):
        per_token = model.moe_router_topk * (8 + router_bytes(model)) + 1
        per_layer += 2 * anchor_tokens(cfg, dp) * per_token
    return moe_layers * per_layer


def routing_stats_bytes(cfg, moe_layers: int, dp: int) -> int:
    """Statistics pending during the forward/backward (module docstring)."""
    if not vp2o_on(cfg) or not moe_layers:
        return 0
    rl = cfg.rl
    micro = math.ceil(rl.prompts_per_step * rl.policy_loss.group_size / (dp * rl.micro_batch_size))
    spec = knobs(cfg).specialization
    values = micro * ((spec.var_coef > 0) + (spec.ortho_coef > 0))
    return 4 * moe_layers * min(values, _PENDING_LOSSES - 1)

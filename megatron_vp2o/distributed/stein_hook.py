"""The Stein gradient hook: transport expert gradients in megatron's DDP grad buffers (spec 2.8).

Where (the one seam): after ``get_forward_backward_func()`` returns -- its last act is
``finalize_model_grads`` (``finish_grad_sync``: all-reduce, or reduce-scatter with the distributed
optimizer, with or without ``overlap_grad_reduce``, after all micro-batches of gradient
accumulation; then the 1/N per-token scaling) -- and before ``optimizer.step()``
(``prepare_grads`` -> inf check -> ``clip_grad_norm`` -> ``step_with_ready_grads``). We transform
``param.main_grad`` of the expert parameters in place, so every megatron optimizer (FP32,
Float16, Distributed, Chained) copies already-transported gradients into its main grads, clips
them and steps. Why not inside ``prepare_grads``: with the distributed optimizer the main grads
are flat DP shards with no expert structure; the DDP buffers hold whole experts. With the
distributed optimizer the expert buckets are first all-gathered over the expert-DP group
(`reductions.gather_expert_grads`), so all replicas compute the identical transform and each keeps
its own shard. Inf check: a device-side flag (any non-finite expert grad on any rank, summed over
the world) makes the transform the identity (``torch.where``), leaving megatron's own checks and
the trust region (a NaN D_anc is a violation) to act; no host sync.

What, per MoE layer, one layer at a time (spec 2.5-2.8): counts summed over token-holding ranks ->
C, active set, neighbour masks, kernel on the all-gathered prototypes, sparse attraction weights;
neighbour gradients fetched over EP with a static-shape all-to-all (`exchange_neighbours`);
grad_i = [i in A] (sum_j w_ij g_j + alpha dR_i/dW_i) with z = W W^T u all-reduced over expert-TP.
`transport_rows` is the pure tensor work (static shapes, no host syncs; traced with
torch.compile(fullgraph=True) in tests).

Exchange cost (static shapes): each EP rank sends every other EP rank a [X, P] buffer in which
only the rows that rank needs are non-zero: (ep - 1) X P elements moved per rank; a variable-size
exchange would move only the <= X m distinct rows needed but needs the counts on the host.
The metrics report both.

Shape legend: E experts, X local experts, M1 = m + 1 neighbour slots, P flattened expert params,
D hidden, F expert ffn shard, R EP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vp2o.algo.coactivation import active_experts, coactivation_matrix, neighbour_masks
from megatron_vp2o.algo.config import SteinConfig
from megatron_vp2o.algo.kernels import prototype_kernel
from megatron_vp2o.algo.prototypes import power_step_partial
from megatron_vp2o.algo.stein import attraction_weights, gather_mix, repulsion_grad_from_z
from megatron_vp2o.distributed.reductions import VP2OGroups, _size, all_reduce_, gather_expert_grads
from megatron_vp2o.distributed.reductions import reduce_counts_, world_sum


def layer_masks(counts_EE, protos_ED, num_tokens, cfg: SteinConfig, top_k: int):
    """(active_E, coactive_EE, inactive_EE, kernel_EE, idx_EM1, w_EM1) from reduced counts."""
    m = cfg.resolved_topm(top_k)
    active_E = active_experts(counts_EE)
    coactive_EE, inactive_EE = neighbour_masks(coactivation_matrix(counts_EE, num_tokens), m)
    kernel_EE = prototype_kernel(protos_ED, cfg.kernel_tau0, cfg.kernel)
    idx_EM1, w_EM1 = attraction_weights(kernel_EE, coactive_EE, m)
    return active_E, coactive_EE, inactive_EE, kernel_EE, idx_EM1, w_EM1


def requested_rows(idx_EM1: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """need[q, e]: some local expert of EP rank q has expert e among its neighbour slots, [R, E]."""
    num_experts = idx_EM1.shape[0]
    hits_EE = torch.zeros(num_experts, num_experts, dtype=torch.bool, device=idx_EM1.device)
    hits_EE = hits_EE.scatter(1, idx_EM1, True)  # hits[i, e]: i needs e
    return hits_EE.view(num_ranks, num_experts // num_ranks, num_experts).any(1)


def exchange_neighbours(grads_XP: torch.Tensor, idx_EM1: torch.Tensor, ep_group) -> torch.Tensor:
    """[E, P] table whose rows hold every gradient this rank's experts need (others zero).

    Static shapes: one all_to_all of [R, X, P]; the row block for destination q is our experts'
    gradients masked by what q needs.
    """
    num_ranks = _size(ep_group)
    if num_ranks == 1:
        return grads_XP
    rank, num_local = dist.get_rank(ep_group), grads_XP.shape[0]
    need_RE = requested_rows(idx_EM1, num_ranks)
    mine_RX = need_RE[:, rank * num_local:(rank + 1) * num_local]
    send_RXP = torch.where(mine_RX.unsqueeze(-1), grads_XP.unsqueeze(0), 0.0).contiguous()
    recv_RXP = torch.empty_like(send_RXP)
    dist.all_to_all_single(recv_RXP, send_RXP, group=ep_group)
    return recv_RXP.view(num_ranks * num_local, -1)


def transport_rows(table_EP, grads_XP, idx_XM1, w_XM1, active_X, rep_XQ, alpha: float, ok):
    """grad_x = [x in A] (sum_m w[x, m] table[idx[x, m]] + alpha rep_x); identity unless ``ok``.

    ``rep_XQ`` (or None) is the repulsion gradient of the trailing Q columns (fc2; Q <= P).
    Returns (transported [X, P], norm of the applied attraction). Pure tensor work (static
    shapes, no host syncs); the mix is `algo.stein.gather_mix` (one fused pass) with the weights
    of experts outside the active set zeroed, so the output is written in two passes.
    """
    keep_X1 = active_X.unsqueeze(-1)
    mix_XP = gather_mix(table_EP, idx_XM1, w_XM1 * keep_X1.to(w_XM1.dtype))
    attraction_norm = torch.linalg.vector_norm(mix_XP)
    if rep_XQ is not None and alpha != 0.0:
        cols = rep_XQ.shape[-1]
        mix_XP[:, mix_XP.shape[-1] - cols:] += rep_XQ.to(mix_XP.dtype) * (alpha * keep_X1.to(mix_XP.dtype))
    return torch.where(ok, mix_XP, grads_XP), attraction_norm


def layer_repulsion(layer, masks, cfg: SteinConfig, groups: VP2OGroups):
    """dR/dW of the local experts laid out like the fc2 columns of the flat gradient [X, P2], or
    None if alpha = 0."""
    if cfg.repulsion_coef == 0.0:
        return None
    acc, off, num_local = layer.accessor, layer.expert_offset, layer.num_local_experts
    weight_XDF = acc.fc2_weight_XDF().float()
    protos_ED = layer.protos_ED
    z_XD = all_reduce_(power_step_partial(weight_XDF, protos_ED[off:off + num_local]), groups.expert_tp)
    inactive_XE = masks[2][off:off + num_local]
    rep_XDF = repulsion_grad_from_z(weight_XDF, protos_ED, z_XD, inactive_XE, cfg.kernel_tau0,
                                    cfg.kernel, off)
    return acc.fc2_flat(rep_XDF)


def apply_stein(ddp_model, layers, groups: VP2OGroups, cfg: SteinConfig, num_tokens) -> dict:
    """Transport the expert gradients of ``layers`` in place (module docstring); returns metrics.

    ``num_tokens``: routed tokens per layer over all micro-batches and ranks (T of spec 2.5).
    Also leaves ``layer.active_E`` for the freeze of inactive experts.
    """
    gathered = gather_expert_grads(ddp_model)
    grads = [layer.accessor.grads_XP().float() for layer in layers]
    # One reduction per layer: a sum is non-finite iff some element is (or it overflows fp32, which
    # also leaves the gradients alone).
    bad = (~torch.isfinite(torch.stack([g.sum() for g in grads]))).sum(0, keepdim=True).float() \
        if grads else torch.zeros(1)
    ok = world_sum(bad)[0] == 0
    metrics = {"stein/grad_gather_bytes": gathered, "stein/nonfinite": (~ok).float()}
    for layer, grads_XP in zip(layers, grads):
        metrics.update({f"{k}/layer{layer.layer_number}": v for k, v in
                        _layer_step(layer, grads_XP, groups, cfg, num_tokens, ok).items()})
    return metrics


def _layer_step(layer, grads_XP, groups, cfg, num_tokens, ok) -> dict:
    counts_EE = reduce_counts_(layer.counts_EE, groups)
    masks = layer_masks(counts_EE, layer.protos_ED, num_tokens, cfg, layer.top_k)
    active_E, coactive_EE, _, kernel_EE, idx_EM1, w_EM1 = masks
    off, num_local = layer.expert_offset, layer.num_local_experts
    table_EP = exchange_neighbours(grads_XP, idx_EM1, groups.expert_ep)
    rep_XQ = layer_repulsion(layer, masks, cfg, groups)
    rows = slice(off, off + num_local)
    out_XP, attraction_norm = transport_rows(table_EP, grads_XP, idx_EM1[rows], w_EM1[rows], active_E[rows],
                                            rep_XQ, cfg.repulsion_coef, ok)
    layer.accessor.write_grads_XP(out_XP)
    layer.active_E = active_E
    num_ranks = _size(groups.expert_ep)
    need = requested_rows(idx_EM1, num_ranks)[dist.get_rank(groups.expert_ep) if num_ranks > 1 else 0]
    remote = need.clone()
    remote[rows] = False
    row_bytes = grads_XP.shape[1] * grads_XP.element_size()
    return exchange_metrics(row_bytes, num_ranks, num_local, remote) | {
        "stein/attraction_norm": attraction_norm,
        "stein/repulsion_norm": (cfg.repulsion_coef * rep_XQ).norm() if rep_XQ is not None
        else torch.zeros(()),
        "stein/kernel_mass": (kernel_EE.sum() - kernel_EE.diagonal().sum()) / max(
            kernel_EE.numel() - kernel_EE.shape[0], 1),
        "stein/active_experts": active_E.sum(),
        "stein/coactive_pairs": coactive_EE.sum(),
    }


def exchange_metrics(row_bytes: int, num_ranks: int, num_local: int, remote_E) -> dict:
    """Bytes the static exchange moved vs the rows actually needed vs the local expert grads."""
    return {"exchange/bytes_moved": (num_ranks - 1) * num_local * row_bytes,
            "exchange/bytes_needed": remote_E.sum() * row_bytes,
            "exchange/local_grad_bytes": num_local * row_bytes}

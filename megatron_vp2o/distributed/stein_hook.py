"""The Stein gradient hook: transport expert gradients in megatron's DDP grad buffers (method §2.8).

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

What, per MoE layer, one layer at a time (method §2.5-2.8): counts summed over token-holding ranks ->
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

from megatron_vp2o.device import device
from megatron_vp2o.algo.coactivation import active_experts, coactivation_matrix, neighbour_masks
from megatron_vp2o.algo.config import SteinConfig
from megatron_vp2o.algo.diagnostics import expert_shares, kernel_spread
from megatron_vp2o.algo.kernels import prototype_kernel
from megatron_vp2o.algo.prototypes import power_step_partial
from megatron_vp2o.algo.scalars import as_scalar
from megatron_vp2o.algo.stein import attraction_weights, gather_mix, rank_two_norm, repulsion_factors_from_z
from megatron_vp2o.distributed.reductions import VP2OGroups, group_size, all_reduce_, gather_expert_grads
from megatron_vp2o.distributed.reductions import reduce_counts_, world_sum


def layer_masks(counts_EE, protos_ED, num_tokens, cfg: SteinConfig, top_k: int):
    """(active_E, coactive_EE, inactive_EE, kernel_EE, idx_EM1, w_EM1) from reduced counts."""
    m = cfg.resolved_topm(top_k)
    active_E = active_experts(counts_EE)
    coactive_EE, inactive_EE = neighbour_masks(coactivation_matrix(counts_EE, num_tokens), m)
    kernel_EE = prototype_kernel(protos_ED, **cfg.kernel_args())
    idx_EM1, w_EM1 = attraction_weights(kernel_EE, coactive_EE, m if cfg.attraction else 0)  # 0: self only
    return active_E, coactive_EE, inactive_EE, kernel_EE, idx_EM1, w_EM1


def requested_rows(idx_EM1: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """need[q, e]: some local expert of EP rank q has expert e among its neighbour slots, [..., R, E]."""
    num_experts = idx_EM1.shape[-2]
    hits_EE = torch.zeros(*idx_EM1.shape[:-1], num_experts, dtype=torch.bool, device=idx_EM1.device)
    hits_EE = hits_EE.scatter(-1, idx_EM1, True)  # hits[i, e]: i needs e
    return hits_EE.view(*idx_EM1.shape[:-2], num_ranks, num_experts // num_ranks, num_experts).any(-2)


def exchange_neighbours(grads_XP: torch.Tensor, idx_EM1: torch.Tensor, ep_group) -> torch.Tensor:
    """[E, P] table whose rows hold every gradient this rank's experts need (others zero).

    Static shapes: one all_to_all of [R, X, P]; the row block for destination q is our experts'
    gradients masked by what q needs.
    """
    num_ranks = group_size(ep_group)
    if num_ranks == 1:
        return grads_XP
    rank, num_local = dist.get_rank(ep_group), grads_XP.shape[0]
    need_RE = requested_rows(idx_EM1, num_ranks)
    mine_RX = need_RE[:, rank * num_local:(rank + 1) * num_local]
    send_RXP = torch.where(mine_RX.unsqueeze(-1), grads_XP.unsqueeze(0), 0.0).contiguous()
    recv_RXP = torch.empty_like(send_RXP)
    dist.all_to_all_single(recv_RXP, send_RXP, group=ep_group)
    return recv_RXP.view(num_ranks * num_local, -1)


def transport_rows(table_EP, idx_XM1, w_XM1, active_X, ok, rep=None, alpha: float = 0.0, raw_XP=None):
    """grad_x = [x in A] (sum_m w[x, m] table[idx[x, m]] + alpha rep_x); the identity unless ``ok``.

    ``rep`` (or None) is the repulsion gradient of the block's rows as rank-two factors
    ``(left [..., X, A, 2], right [..., X, 2, C])`` whose product ``[A, C]`` is each row's layout
    (fc2's ``[D, F]``, or ``[F, D]`` for GroupedMLP: the caller passes the factors transposed).
    Returns (transported [..., X, P], norm of the applied attraction per leading index), and with
    ``raw_XP`` (the rows' own untransported gradients) a third value: ||attraction - raw||. Pure
    tensor work (static shapes, no host syncs; leading batch dims = layers), two passes over the
    rows: the mix (`algo.stein.gather_mix`, one fused pass) and the repulsion added in place by one
    batched matmul-add. ``ok`` enters the weights: False makes each row's weights its own row with
    weight 1 (and drops the repulsion), so finite gradients come back unchanged; a non-finite
    neighbour row can then leave non-finite values in other rows of its layer, which megatron's
    inf check skips as it would have anyway.
    """
    keep_X1 = active_X.unsqueeze(-1).to(w_XM1.dtype)
    self_w_XM1 = torch.zeros_like(w_XM1)  # slot 0 is the expert itself (attraction_weights)
    self_w_XM1[..., 0] = 1.0
    w_XM1 = torch.where(ok, w_XM1 * keep_X1, self_w_XM1)
    out_XP = gather_mix(table_EP, idx_XM1, w_XM1)
    attraction_norm = torch.linalg.vector_norm(out_XP, dim=(-2, -1))
    shift_norm = None if raw_XP is None else torch.linalg.vector_norm(out_XP - raw_XP, dim=(-2, -1))
    if rep is not None and alpha != 0.0:
        left_XA2, right_X2C = rep
        scale_X11 = (keep_X1 * ok.to(keep_X1.dtype) * alpha).unsqueeze(-1).to(out_XP.dtype)
        rows_NAC = out_XP.view(-1, left_XA2.shape[-2], right_X2C.shape[-1])
        lead = rows_NAC.shape[0]
        rows_NAC.baddbmm_((left_XA2.to(out_XP.dtype) * scale_X11).reshape(lead, -1, 2),
                          right_X2C.to(out_XP.dtype).reshape(lead, 2, -1))
    if raw_XP is not None:
        return out_XP, attraction_norm, shift_norm
    return out_XP, attraction_norm


def layer_repulsion(layers, inactive_LEE, protos_LED, cfg: SteinConfig, groups: VP2OGroups):
    """dR/dW of the local experts of same-shaped ``layers`` as rank-two factors laid out like the
    fc2 rows of their flat gradients (`transport_rows`), and its norm per layer; (None, None) if
    alpha = 0. One layer's fc2 weights at a time (an fp32 copy of that layer only: the Stein hook
    holds one layer's expert-sized buffers, never all layers'); the factors are small
    ([L, X, D, 2], [L, X, 2, F]) and stacked for the transport."""
    if cfg.repulsion_coef == 0.0:
        return None, None
    off, num_local = layers[0].expert_offset, layers[0].num_local_experts
    lefts, rights = [], []
    for i, layer in enumerate(layers):
        weight_XDF = layer.accessor.fc2_weight_XDF().float()
        z_XD = all_reduce_(power_step_partial(weight_XDF, protos_LED[i, off:off + num_local]), groups.expert_tp)
        left_XD2, right_X2F = repulsion_factors_from_z(weight_XDF, protos_LED[i], z_XD,
                                                       inactive_LEE[i, off:off + num_local], cfg.kernel_tau0,
                                                       cfg.kernel, off, cfg.kernel_bandwidth, cfg.kernel_sharpness)
        del weight_XDF
        lefts.append(left_XD2)
        rights.append(right_X2F)
    left_LXD2, right_LX2F = torch.stack(lefts), torch.stack(rights)
    norm_L = rank_two_norm(left_LXD2, right_LX2F)
    if layers[0].accessor.fc2_transposed:  # rows hold W^T [F, D]: (L R)^T = R^T L^T
        return (right_LX2F.transpose(-1, -2), left_LXD2.transpose(-1, -2)), norm_L
    return (left_LXD2, right_LX2F), norm_L


def apply_stein(ddp_model, layers, groups: VP2OGroups, cfg: SteinConfig, num_tokens) -> dict:
    """Transport the expert gradients of ``layers`` in place (module docstring); returns metrics.

    ``num_tokens``: routed tokens per layer over all micro-batches and ranks (T of method §2.5).
    Layers of the same shapes (usually all) share one batch [L, ...] for the masks and kernels
    (small: E x E; one counts all-reduce); the repulsion factors (rank two) are computed one layer
    at a time from that layer's fc2 weights (one expert-TP all-reduce each, `layer_repulsion`);
    the gradients are transported one layer at a time: the layer's two column blocks, fc1 [X, P1]
    and fc2 [X, P2] (the transport is row mixing, so blocks are independent; the repulsion touches
    fc2 only), are gathered into one fp32 buffer sized by the largest MoE layer of the stage
    (allocated once per call, reused by every layer), mixed (with EP > 1 through one static-shape
    neighbour exchange), and copied back into megatron's grad buffers. Memory: one layer's gather
    copy, output and exchange, not all layers'. Also leaves ``layer.active_E`` for the freeze of
    inactive experts.
    """
    gathered = gather_expert_grads(ddp_model)
    metrics = {"stein/grad_gather_bytes": gathered}
    if not layers:
        return metrics | {"stein/nonfinite": torch.zeros((), device=device())}
    batches: dict = {}
    for layer in layers:
        views = {kind: layer.accessor.grad_views(kind) for kind in ("fc1", "fc2")}
        key = (tuple(v[0].shape[1] for v in views.values()), tuple(layer.protos_ED.shape), layer.top_k,
               layer.expert_offset, layer.num_local_experts)
        batches.setdefault(key, []).append((layer, views))
    # One reduction per layer and block, on the grad views themselves (no copy): a sum is
    # non-finite iff some element is (or it overflows fp32, which also leaves the gradients alone).
    sums = [torch.stack([v.float().sum() for v in views[kind]]).sum()
            for entries in batches.values() for _, views in entries for kind in ("fc1", "fc2")]
    bad = (~torch.isfinite(torch.stack(sums))).sum(0, keepdim=True)
    ok = world_sum(bad.float())[0] == 0
    metrics["stein/nonfinite"] = (~ok).float()
    largest = max(sum(v.numel() for kind in ("fc1", "fc2") for v in views[kind])
                  for entries in batches.values() for _, views in entries)
    buffer = torch.empty(largest, dtype=torch.float32, device=layers[0].counts_EE.device)
    for entries in batches.values():
        metrics.update(_layers_step(entries, buffer, groups, cfg, num_tokens, ok))
    return metrics


def _gather_layer(views: dict, buffer: torch.Tensor, num_local: int) -> dict:
    """One layer's fc1 / fc2 gradient rows, fp32, as [X, P1] and [X, P2] views of ``buffer``."""
    out, start = {}, 0
    for kind in ("fc1", "fc2"):
        cols = sum(v.shape[1] for v in views[kind][:1])
        rows = sum(v.shape[0] for v in views[kind])
        block = buffer[start:start + rows * cols].view(rows, cols)
        torch._foreach_copy_(list(block.split([v.shape[0] for v in views[kind]])), views[kind])
        out[kind] = block.view(num_local, -1)
        start += rows * cols
    return out


def _transport_blocks(blk, idx, w, active, rep, cfg, ok, ep_group, num_ranks):
    """Both column blocks of one layer (or a batch of layers when every neighbour is local).

    Returns (outputs, attraction norm, squared norms [raw, attraction - raw, transported - raw] of
    this rank's rows: the Stein relative change, summed over ranks by the caller)."""
    outs, sq_norm, sq = {}, 0.0, [0.0, 0.0, 0.0]
    for kind, grads in blk.items():
        table = grads if num_ranks == 1 else exchange_neighbours(grads, idx["all"], ep_group)
        rep_kind = rep if kind == "fc2" else None
        outs[kind], norm, shift = transport_rows(table, idx["rows"], w, active, ok, rep_kind, cfg.repulsion_coef,
                                                 raw_XP=grads)
        sq_norm = sq_norm + norm * norm
        total = shift if rep_kind is None or cfg.repulsion_coef == 0.0 else torch.linalg.vector_norm(outs[kind] - grads)
        sq = [sq[0] + grads.square().sum(), sq[1] + shift * shift, sq[2] + total * total]
    return outs, torch.sqrt(sq_norm), torch.stack([as_scalar(x, norm, torch.float32) for x in sq])


def _rank_two_sq_norms(left_XA2, right_X2C):
    """||left_x @ right_x||_F^2 per row x, from [2, 2] Gram matrices (no product): [..., X]."""
    gram_l = torch.matmul(left_XA2.transpose(-1, -2), left_XA2)
    gram_r = torch.matmul(right_X2C, right_X2C.transpose(-1, -2))
    return (gram_l * gram_r).sum((-2, -1)).clamp_min(0.0)


def _relative_change(sq_L3, rep_L, active_LX, ok, alpha: float, groups: VP2OGroups) -> torch.Tensor:
    """Stein relative change per layer, [L, 3]: ||attraction - raw||, ||applied repulsion|| and
    ||transported - raw||, each over ||raw||, with the squared norms summed over the expert-EP and
    expert-TP ranks (one small all-reduce each). The applied repulsion is alpha dR/dW on active
    rows when the transport ran, its norm from the rank-two factors' Gram matrices."""
    rep_sq_L = torch.zeros_like(sq_L3[:, 0])
    if rep_L is not None and alpha != 0.0:
        keep_LX = active_LX.to(rep_sq_L.dtype) * ok.to(rep_sq_L.dtype)
        rep_sq_L = alpha * alpha * (_rank_two_sq_norms(rep_L[0].float(), rep_L[1].float()) * keep_LX).sum(-1)
    sq_L4 = torch.cat([sq_L3, rep_sq_L.unsqueeze(-1)], -1)
    sq_L4 = all_reduce_(all_reduce_(sq_L4, groups.expert_ep), groups.expert_tp)
    raw_L1 = sq_L4[:, :1].clamp_min(1e-30)
    return torch.sqrt(sq_L4[:, [1, 3, 2]] / raw_L1)


def _layers_step(entries, buffer, groups, cfg, num_tokens, ok) -> dict:
    layers = [layer for layer, _ in entries]
    counts_LEE = reduce_counts_(torch.stack([layer.counts_EE for layer in layers]), groups)
    torch._foreach_copy_([layer.counts_EE for layer in layers], list(counts_LEE.unbind(0)))
    protos_LED = torch.stack([layer.protos_ED for layer in layers])
    masks = layer_masks(counts_LEE, protos_LED, num_tokens, cfg, layers[0].top_k)
    active_LE, coactive_LEE, inactive_LEE, kernel_LEE, idx_LEM1, w_LEM1 = masks
    off, num_local = layers[0].expert_offset, layers[0].num_local_experts
    rows = slice(off, off + num_local)
    rep_L, rep_norm_L = layer_repulsion(layers, inactive_LEE, protos_LED, cfg, groups)
    num_ranks = group_size(groups.expert_ep)
    norms, sq_norms = [], []
    for i, (_, views) in enumerate(entries):  # one layer at a time: one layer's buffers
        blk = _gather_layer(views, buffer, num_local)
        out_i, norm, sq_i = _transport_blocks(blk, {"all": idx_LEM1[i], "rows": idx_LEM1[i, rows]}, w_LEM1[i, rows],
                                        active_LE[i, rows], None if rep_L is None else (rep_L[0][i], rep_L[1][i]),
                                        cfg, ok, groups.expert_ep, num_ranks)
        for kind, out_XP in out_i.items():  # back into megatron's grad buffers: one fused copy per block
            torch._foreach_copy_(views[kind], list(out_XP.split([v.shape[0] for v in views[kind]])))
        norms.append(norm)
        sq_norms.append(sq_i)
    attraction_L = torch.stack(norms)
    change_L = _relative_change(torch.stack(sq_norms), rep_L, active_LE[:, rows], ok, cfg.repulsion_coef, groups)
    spread = kernel_spread(kernel_LEE)
    shares = expert_shares(active_LE, coactive_LEE, inactive_LEE)
    blk = {kind: views[kind][0] for kind in ("fc1", "fc2")}
    for layer, active_E in zip(layers, active_LE.unbind(0)):
        layer.active_E = active_E
    need_LE = requested_rows(idx_LEM1, num_ranks)[:, dist.get_rank(groups.expert_ep) if num_ranks > 1 else 0]
    remote_LE = need_LE.clone()
    remote_LE[:, rows] = False
    row_bytes = sum(b.shape[-1] for b in blk.values()) * 4  # fp32 rows
    num_experts = kernel_LEE.shape[-1]
    per_layer = {
        "stein/attraction_norm": attraction_L,
        "stein/repulsion_norm": cfg.repulsion_coef * rep_norm_L if rep_norm_L is not None
        else torch.zeros(len(layers), device=attraction_L.device),
        "stein/kernel_mass": (kernel_LEE.sum((-2, -1)) - kernel_LEE.diagonal(dim1=-2, dim2=-1).sum(-1))
        / max(num_experts * num_experts - num_experts, 1),
        "stein/active_experts": active_LE.sum(-1),
        "stein/coactive_pairs": coactive_LEE.sum((-2, -1)),
        "stein/rel_change": change_L[:, 2],
        "stein/rel_change_attraction": change_L[:, 0],
        "stein/rel_change_repulsion": change_L[:, 1],
        "stein/kernel_min": spread["min"],
        "stein/kernel_median": spread["median"],
        "stein/kernel_max": spread["max"],
        "stein/share_active": shares["active"],
        "stein/share_coactive": shares["coactive"],
        "stein/share_inactive": shares["inactive"],
        "exchange/bytes_needed": remote_LE.sum(-1) * row_bytes,
    }
    out = {}
    for i, layer in enumerate(layers):
        n = layer.layer_number
        out |= {f"{k}/layer{n}": v[i] for k, v in per_layer.items()}
        out[f"exchange/bytes_moved/layer{n}"] = (num_ranks - 1) * num_local * row_bytes
        out[f"exchange/local_grad_bytes/layer{n}"] = num_local * row_bytes
    return out

"""Routing capture, rollout routing replay (R3) and rollout positions, through module hooks only.

* :class:`RoutingCapture` -- a forward hook on every megatron ``TopKRouter`` of a model chunk keeps, per
  forward, the routing probabilities; the top-k experts and their gates renormalised over the top-k
  are taken once for all forwards at the end. The router sees tokens
  sequence-major (row = s * B + b) and, under sequence parallelism, only this TP rank's slice of the
  sequence, so the hook all-gathers the slices over the TP group first.
* :func:`replay_routing` -- R3 through megatron-core's own ``RouterReplay`` (needs
  ``TransformerConfig(moe_enable_routing_replay=True)``). It fails loudly on megatron's silent failure
  modes: a row count that differs from the routed tokens (megatron would route some tokens to no
  expert), and rows in the wrong order (batch-major instead of sequence-major, another TP slice): the
  hook compares the replayed experts with the router's own top-k and raises when fewer than
  ``min_agreement`` of the tokens agree (the policy drifts little between refreshes; a permutation
  drops agreement to chance). With activation recompute the caller must also switch to
  ``REPLAY_BACKWARD`` for the backward (megatron's rule), which this forward-side helper does not do.
* :func:`rope_positions` -- megatron's GPTModel derives RoPE from the column index (``position_ids`` is
  ignored for ``rope``); a forward hook on ``model.rotary_pos_emb`` re-indexes its table by per-row
  positions, giving ``[S, B, 1, D]`` embeddings that megatron's unfused RoPE broadcasts (the static KV
  cache slices them by column, so cached decoding sees the same positions).

Shape legend: L MoE layers of this chunk, B sequences, S columns, N = S * B routed tokens, K top-k,
E experts, H hidden, D rotary dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_vp2o.device import device


class ReplayError(RuntimeError):
    """Routing replay would silently route the wrong tokens."""


def moe_routers(model) -> list[TopKRouter]:
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def _sp_gather(rows_NX: torch.Tensor, router: TopKRouter) -> torch.Tensor:
    group = router.tp_group
    if not router.config.sequence_parallel or group is None or group.size() == 1:
        return rows_NX
    parts = [torch.empty_like(rows_NX) for _ in range(group.size())]
    dist.all_gather(parts, rows_NX.contiguous(), group=group)
    return torch.cat(parts, dim=0)  # SP slices are contiguous column blocks: concatenation restores order


def topk_and_gates(probs_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts with nonzero probability, by gate (descending), and gates renormalised over them."""
    vals_NK, idx_NK = probs_NE.float().topk(k, dim=-1)
    return idx_NK, vals_NK / vals_NK.sum(-1, keepdim=True).clamp_min(1e-20)


class RoutingCapture:
    """Context manager: keeps each router's ``[B, S_step, E]`` probabilities per forward; `stacked`
    turns them into top-k and gates once at the end (not per decoding step)."""

    def __init__(self, model):
        self.routers = moe_routers(model)
        self.layers = [r.layer_number for r in self.routers]
        self.probs: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self.enabled = True
        self.keep_last: int | None = None  # keep only the last n columns of each forward (no-cache decoding)
        self._handles = []

    def _hook(self, i):
        def hook(router, args, output):
            if not self.enabled:
                return
            hidden_SBH, (probs_NE, _) = args[0], output
            s_local, b = hidden_SBH.shape[0], hidden_SBH.shape[1]
            probs_NE = _sp_gather(probs_NE.detach(), router)
            s = probs_NE.shape[0] // b
            assert s * b == probs_NE.shape[0] and s % s_local == 0, (probs_NE.shape, hidden_SBH.shape)
            keep = s if self.keep_last is None else self.keep_last
            self.probs[i].append(probs_NE.view(s, b, -1).transpose(0, 1)[:, s - keep:])
        return hook

    def __enter__(self):
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_idx_LBSK, gates_LBSK)`` over all captured forwards (columns concatenated)."""
        if not self.routers:
            dev = device()
            return torch.zeros(0, 0, 0, 0, dtype=torch.long, device=dev), torch.zeros(0, 0, 0, 0, device=dev)
        probs_LBSE = torch.stack([torch.cat(chunks, dim=1) for chunks in self.probs])
        idx_LBSK, gates_LBSK = topk_and_gates(probs_LBSE, self.routers[0].topk)
        return idx_LBSK, gates_LBSK


def replay_rows(topk_idx_BSK: torch.Tensor, router: TopKRouter) -> torch.Tensor:
    """Megatron's replay rows for one layer: sequence-major ``[N, K]``, this TP rank's SP slice."""
    rows_SBK = topk_idx_BSK.transpose(0, 1)
    group = router.tp_group
    if router.config.sequence_parallel and group is not None and group.size() > 1:
        s = rows_SBK.shape[0]
        if s % group.size():
            raise ReplayError(f"sequence length {s} is not divisible by tp={group.size()} (sequence parallel)")
        per = s // group.size()
        rows_SBK = rows_SBK[group.rank() * per:(group.rank() + 1) * per]
    return rows_SBK.reshape(-1, rows_SBK.shape[-1]).contiguous()


def _check_hook(min_agreement: float | None, stats: list):
    def hook(router, args, output):
        hidden_SBH = args[0]
        n = hidden_SBH.shape[0] * hidden_SBH.shape[1]
        target_NK = router.router_replay.target_topk_idx
        if target_NK.shape[0] != n:
            raise ReplayError(f"layer {router.layer_number}: {target_NK.shape[0]} replay rows for {n} routed tokens")
        with torch.no_grad():
            own_NK = router.gating(hidden_SBH).view(n, -1).topk(router.topk, dim=-1).indices
            agree = (own_NK.sort(-1).values == target_NK.to(own_NK.device).sort(-1).values).all(-1).float().mean()
        stats.append((router.layer_number, float(agree)))
        if min_agreement is not None and agree < min_agreement:
            raise ReplayError(
                f"layer {router.layer_number}: replayed experts agree with the router's own top-k on only "
                f"{float(agree):.1%} of tokens (< {min_agreement:.0%}): rows are probably in the wrong order "
                "(megatron wants sequence-major rows, s * B + b, of this TP rank's sequence slice)")
    return hook


@contextlib.contextmanager
def replay_routing(model, topk_idx_LBSK: torch.Tensor, moe_layers: list[int], min_agreement: float | None = 0.5):
    """Forwards inside replay the logged routing (R3) on every router of ``model``; yields per-layer agreement."""
    routers = moe_routers(model)
    if any(r.router_replay is None for r in routers):
        raise ReplayError("routing replay needs TransformerConfig(moe_enable_routing_replay=True)")
    where = {layer: i for i, layer in enumerate(moe_layers)}
    missing = [r.layer_number for r in routers if r.layer_number not in where]
    if missing:
        raise ReplayError(f"no logged routing for MoE layers {missing} (logged: {moe_layers})")
    stats: list = []
    handles = [r.register_forward_hook(_check_hook(min_agreement, stats)) for r in routers]
    try:
        for r in routers:
            r.router_replay.clear_indices()
            r.router_replay.set_target_indices(replay_rows(topk_idx_LBSK[where[r.layer_number]], r))
            r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        yield stats
    finally:
        for h in handles:
            h.remove()
        for r in routers:
            r.router_replay.clear_router_replay_action()
            r.router_replay.clear_indices()


@contextlib.contextmanager
def rope_positions(model, positions_BS: torch.Tensor):
    """Forwards inside use RoPE at ``positions_BS`` (per row) instead of the column index."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        yield
        return

    cache: dict = {}  # decoding asks for the same table every step: gather it once per length
    # every row at the same positions (no left padding): one [S, 1, 1, D] table, broadcast over rows
    # by megatron's RoPE, instead of B copies (B x fewer cos/sin/mul elements in every layer)
    same_rows = positions_BS.shape[0] > 1 and bool((positions_BS == positions_BS[:1]).all())

    def hook(module, args, emb_N11D):
        n = emb_N11D.shape[0]
        key = (n, emb_N11D.device, emb_N11D.dtype)
        if key in cache and not torch.is_grad_enabled():
            return cache[key]
        pos_BS = positions_BS
        if pos_BS.shape[1] < n:  # the static KV cache asks for max_sequence_length columns
            extra = pos_BS[:, -1:] + torch.arange(1, n - pos_BS.shape[1] + 1, device=pos_BS.device)
            pos_BS = torch.cat([pos_BS, extra], dim=1)
        if same_rows:
            pos_BS = pos_BS[:1]
        pos_SB = pos_BS[:, :n].t().clamp_max(n - 1).to(emb_N11D.device)
        out = emb_N11D[:, 0][pos_SB]  # [S, B, 1, D] ([S, 1, 1, D] when every row is the same)
        if not torch.is_grad_enabled():
            cache[key] = out
        return out

    handle = rope.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

"""Trust-region step control across ranks: snapshot, backtrack, reject, refresh (spec 2.8, 2.10).

What: `ParamSnapshot` copies, before ``optimizer.step()``, everything the step changes on this
rank: every model parameter (full tensor), every optimizer main parameter that is not a view of a
model parameter (fp32 masters of bf16 params; distributed-optimizer shards), and every optimizer
state tensor (Adam ``exp_avg``, ``exp_avg_sq``, ``step``). From it:
- ``restore()``: exact (bitwise) restore of parameters and optimizer state (`reject`);
- ``restore(mask)``: restore only masked elements -- the freeze of inactive experts (spec 2.8
  `freeze_inactive`) reuses the same snapshot, so it costs no extra memory;
- ``scale_update(after, s)``: parameters <- before + s (after - before) (`backtrack`; optimizer
  moments keep their post-step values: the step was taken, only shortened).
`anchor_decision` evaluates D_anc (spec 2.10) with sums and counts reduced over every rank of
every pipeline stage, so `decide` returns the same code everywhere; the caller reads it once.

Memory cost: one copy of the local model parameters (P_model x param dtype), plus the non-aliased
main parameters (fp32 masters: P_main x 4 bytes, a 1/DP shard with the distributed optimizer),
plus the optimizer state (2 x P_main x 4 bytes for Adam), held persistently (allocated once,
refreshed each step by one fused ``torch._foreach_copy_``). Only a backtrack also copies the
post-step parameters (another P_model + P_main, transient); an accepted step copies nothing else.
E.g. bf16 + distributed optimizer over DP ranks: 2 P + (4 + 8) P / DP bytes, plus the parameter
part again while backtracking.

Shape legend: T tokens, K top-k, E experts, D hidden.
"""

from __future__ import annotations

import torch

from megatron_vp2o.device import device
from megatron_vp2o.algo import trust_region as tr
from megatron_vp2o.distributed.reductions import world_sum


def _leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_param_entries(optimizer) -> list[tuple]:
    """(model_param, main_param, (start, end) or None) for every main param of ``optimizer``.

    (start, end) is the flat range of the model parameter that a distributed-optimizer shard
    holds; None means the main param has the model param's shape.
    """
    entries = []
    for opt in _leaf_optimizers(optimizer):
        if hasattr(opt, "shard_fp32_groups"):  # DistributedOptimizer
            pairs = [(m, s) for mg, sg in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups)
                     for m, s in zip(mg, sg)]
            pairs += [(m, s) for mg, sg in zip(opt.model_fp32_groups, opt.shard_fp32_groups)
                      for m, s in zip(mg, sg)]
            for model_p, main_p in pairs:
                rng = opt._get_model_param_range_map(model_p)["param"]
                entries.append((model_p, main_p, (rng.start, rng.end)))
        elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
            for mg, sg in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                entries += [(m, s, None) for m, s in zip(mg, sg)]
            entries += [(p, p, None) for g in opt.fp32_from_fp32_groups for p in g]
        else:  # FP32Optimizer
            entries += [(p, p, None) for g in opt.optimizer.param_groups for p in g["params"]]
    return entries


def _states(optimizer) -> dict:
    out = {}
    for opt in _leaf_optimizers(optimizer):
        out.update(opt.optimizer.state)
    return out


class ParamSnapshot:
    """Pre-step copy of parameters, main parameters and optimizer state of one rank.

    The copy lives in buffers allocated once (re-allocated only when the set of tensors changes,
    e.g. after Adam's lazy state init on the first step) and is refreshed by `take` with one
    ``torch._foreach_copy_``; ``params`` limits it to some model parameters (the freeze of
    inactive experts alone needs only the expert parameters and their optimizer state).
    """

    def __init__(self, model, optimizer, params=None):
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters()) if params is None else list(params)
        wanted = {id(p) for p in self.params}
        self.entries = [e for e in main_param_entries(optimizer) if id(e[0]) in wanted]
        storages = {p.untyped_storage().data_ptr() for p in model.parameters()}  # DDP: one param buffer
        self.own_main = [e for e in self.entries if e[1].untyped_storage().data_ptr() not in storages]
        self._key, self._buffers, self.before = None, [], None

    def _live(self) -> tuple[list, list, dict]:
        """(tensors to copy, their (kind, ref) tags, non-tensor state values) as they are now."""
        states = _states(self.optimizer)
        tensors = [p.detach() for p in self.params] + [e[1].detach() for e in self.own_main]
        tags = [("param", i) for i in range(len(self.params))] + [("main", i) for i in range(len(self.own_main))]
        scalars = {}
        for e in self.entries:
            state = states.get(e[1])
            if state is None:
                continue
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors.append(value)
                    tags.append(("state", id(e[1]), key))
                else:
                    scalars[(id(e[1]), key)] = value
        return tensors, tags, scalars

    def take(self) -> "ParamSnapshot":
        """Copy the current values into the snapshot buffers (one fused copy)."""
        tensors, tags, scalars = self._live()
        key = [(t.shape, t.dtype, t.device) for t in tensors], tags
        if key != self._key:
            self._buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
            self._key = key
        if tensors:
            torch._foreach_copy_(self._buffers, tensors)
        self.before = dict(zip(tags, self._buffers))
        self.had_state = {id(e[1]) for e in self.entries if e[1] in _states(self.optimizer)}
        self.scalars = scalars
        return self

    def capture_after(self) -> dict:
        """Clones of the post-step parameters and main parameters (for `scale_update`)."""
        return {"params": [p.detach().clone() for p in self.params],
                "main": [e[1].detach().clone() for e in self.own_main]}

    def restore(self, mask_of=None) -> None:
        """Put back the snapshot; with ``mask_of(model_param) -> bool mask | None`` only there
        (masked restores leave scalar state such as Adam's step count alone)."""
        with torch.no_grad():
            if mask_of is None:
                self._restore_all()
                return
            for i, p in enumerate(self.params):
                _put_masked(p, self.before[("param", i)], mask_of(p))
            for i, e in enumerate(self.own_main):
                _put_masked(e[1], self.before[("main", i)], _main_mask(e, mask_of))
            states = _states(self.optimizer)
            for e in self.entries:
                if id(e[1]) not in self.had_state:
                    continue
                mask = _main_mask(e, mask_of)
                for key, cur in states[e[1]].items():
                    old = self.before.get(("state", id(e[1]), key))
                    if old is not None and torch.is_tensor(cur) and cur.dim() > 0 and cur.shape == old.shape:
                        _put_masked(cur, old, mask)

    def _restore_all(self) -> None:
        states = _states(self.optimizer)
        dst, src = [], []
        for i, p in enumerate(self.params):
            dst.append(p.detach())
            src.append(self.before[("param", i)])
        for i, e in enumerate(self.own_main):
            dst.append(e[1].detach())
            src.append(self.before[("main", i)])
        for e in self.entries:
            main = e[1]
            if id(main) not in self.had_state:
                states.pop(main, None)  # no state before the step (first step): reset it
                continue
            state = states[main]
            for key in list(state):
                old = self.before.get(("state", id(main), key))
                if old is None:
                    state[key] = self.scalars.get((id(main), key), state[key])
                elif torch.is_tensor(state[key]) and state[key].shape == old.shape:
                    dst.append(state[key])
                    src.append(old)
                else:
                    state[key] = old.clone()
        if dst:
            torch._foreach_copy_(dst, src)

    def scale_update(self, after: dict, scale: float) -> None:
        """Parameters <- before + scale (after - before) (spec 2.10 backtracking)."""
        with torch.no_grad():
            for i, (p, new) in enumerate(zip(self.params, after["params"])):
                p.copy_(tr.scaled_update(self.before[("param", i)], new, scale))
            for i, (e, new) in enumerate(zip(self.own_main, after["main"])):
                e[1].copy_(tr.scaled_update(self.before[("main", i)], new, scale))


def _put_masked(dst: torch.Tensor, old: torch.Tensor, mask) -> None:
    if mask is not None:
        dst.copy_(torch.where(mask.view(dst.shape), old, dst))


def _main_mask(entry, mask_of):
    if mask_of is None:
        return None
    model_p, main_p, rng = entry
    mask = mask_of(model_p)
    if mask is None:
        return None
    return mask.reshape(-1)[rng[0]:rng[1]] if rng is not None else mask.view(main_p.shape)


def anchor_statistic(layers, anchors) -> torch.Tensor:
    """D_anc over all layers, tokens and ranks (spec 2.10), identical on every rank.

    ``anchors[i]`` = (anchor protos [E, D], anchor top-k [T, K], anchor gates [T, K], ...) for
    ``layers[i]``, tokens in the order the layer captured them (micro-batches concatenated); only
    the tokens the layer counted (its response mask, captured with the routing) enter the mean.
    Layers with equal shapes are evaluated as one batch [L, ...].
    """
    sums = torch.zeros(2, dtype=torch.float64, device=device())
    batches: dict = {}
    for layer, anchor in zip(layers, anchors):
        topk_TK = torch.cat([c[0] for c in layer.captured])
        gates_TK = torch.cat([c[1] for c in layer.captured])
        counted_T = torch.cat([c[2] for c in layer.captured])  # response tokens (spec 2.10)
        entry = (topk_TK, gates_TK, layer.protos_ED, anchor[1], anchor[2], anchor[0], counted_T)
        batches.setdefault(tuple(tuple(t.shape) for t in entry), []).append(entry)
    for entries in batches.values():
        topk, gates, protos, anc_topk, anc_gates, anc_protos, counted = (torch.stack(ts) for ts in zip(*entries))
        total, count = tr.anchor_distance_sum(topk, gates, protos, anc_topk, anc_gates, anc_protos, counted)
        sums += torch.stack([total.double(), count.double()])
    total, count = world_sum(sums).unbind()
    return total / count.clamp_min(1.0)

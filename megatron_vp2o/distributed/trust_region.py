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
plus the optimizer state (2 x P_main x 4 bytes for Adam). Backtracking also keeps the post-step
parameters (another P_model + P_main). E.g. bf16 + distributed optimizer over DP ranks:
2 P + (4 + 8) P / DP bytes, doubled for the parameter part while backtracking.

Shape legend: T tokens, K top-k, E experts, D hidden.
"""

from __future__ import annotations

import torch

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
    """Pre-step copy of parameters, main parameters and optimizer state of one rank."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters()]
        self.entries = main_param_entries(optimizer)
        storages = {p.untyped_storage().data_ptr() for p in self.params}  # DDP: one param buffer
        self.own_main = [e for e in self.entries if e[1].untyped_storage().data_ptr() not in storages]
        self.before = self._capture()

    def _capture(self) -> dict:
        states = _states(self.optimizer)
        return {
            "params": [p.detach().clone() for p in self.params],
            "main": [e[1].detach().clone() for e in self.own_main],
            "state": {id(e[1]): {k: v.clone() if torch.is_tensor(v) else v
                                 for k, v in states[e[1]].items()}
                      for e in self.entries if e[1] in states},
        }

    def capture_after(self) -> dict:
        return self._capture()

    def restore(self, mask_of=None) -> None:
        """Put back the snapshot; with ``mask_of(model_param) -> bool mask | None`` only there."""
        with torch.no_grad():
            for p, old in zip(self.params, self.before["params"]):
                _put(p, old, mask_of(p) if mask_of else None, full=mask_of is None)
            for e, old in zip(self.own_main, self.before["main"]):
                _put(e[1], old, _main_mask(e, mask_of), full=mask_of is None)
            states = _states(self.optimizer)
            for e in self.entries:
                self._restore_state(states, e, mask_of)

    def _restore_state(self, states, entry, mask_of) -> None:
        main = entry[1]
        saved = self.before["state"].get(id(main))
        if saved is None:
            if mask_of is None:
                states.pop(main, None)  # no state before the step (first step): reset it
            return
        mask = _main_mask(entry, mask_of)
        for key, old in saved.items():
            cur = states[main][key]
            if torch.is_tensor(cur) and cur.shape == old.shape and cur.dim() > 0:
                _put(cur, old, mask, full=mask_of is None)
            elif mask_of is None:
                states[main][key] = old.clone() if torch.is_tensor(old) else old

    def scale_update(self, after: dict, scale: float) -> None:
        """Parameters <- before + scale (after - before) (spec 2.10 backtracking)."""
        with torch.no_grad():
            for p, old, new in zip(self.params, self.before["params"], after["params"]):
                p.copy_(tr.scaled_update(old, new, scale))
            for e, old, new in zip(self.own_main, self.before["main"], after["main"]):
                e[1].copy_(tr.scaled_update(old, new, scale))


def _put(dst: torch.Tensor, old: torch.Tensor, mask, full: bool) -> None:
    if full:
        dst.copy_(old)
    elif mask is not None:
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

    ``anchors[i]`` = (anchor protos [E, D], anchor top-k [T, K], anchor gates [T, K]) for
    ``layers[i]``, tokens in the order the layer captured them (micro-batches concatenated).
    """
    sums = torch.zeros(2, dtype=torch.float64)
    for layer, (protos_anc_ED, topk_anc_TK, gates_anc_TK) in zip(layers, anchors):
        topk_TK = torch.cat([c[0] for c in layer.captured])
        gates_TK = torch.cat([c[1] for c in layer.captured])
        total, count = tr.anchor_distance_sum(topk_TK, gates_TK, layer.protos_ED, topk_anc_TK,
                                              gates_anc_TK, protos_anc_ED)
        sums += torch.stack([total.double(), count.double()])
    total, count = world_sum(sums).unbind()
    return total / count.clamp_min(1.0)

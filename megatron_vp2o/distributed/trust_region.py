"""Trust-region step control across ranks: snapshot, backtrack, reject, refresh (method §2.8, 2.10).

What: `ParamSnapshot` copies, before ``optimizer.step()``, only what the step changes on this rank
and what cannot be rebuilt: every optimizer *main* parameter (fp32 masters of bf16 parameters,
distributed-optimizer shards -- a 1/DP slice --, or the fp32 parameters themselves where they are
their own masters) and every optimizer state tensor (Adam ``exp_avg``, ``exp_avg_sq``, ``step``).
The model parameters are *rebuilt* from the main parameters the way megatron does after a step
(`rebuild_model_params`: the optimizer's main-to-model copy, then the distributed optimizer's
parameter all-gather), so they are never copied. From it:
- ``restore()``: exact (bitwise) restore of parameters and optimizer state (`reject`): the model
  parameters were megatron's rounding of the main parameters before the step, and are again;
- ``restore(mask)``: restore only masked elements -- the freeze of inactive experts (method §2.8
  `freeze_inactive`) reuses the same snapshot, so it costs no extra memory;
- ``scale_update(after, s)``: main <- before + s (after - before), model rebuilt (`backtrack`;
  optimizer moments keep their post-step values: the step was taken, only shortened). ``after``
  (`capture_after`) is held in the DDP gradient buffer, which the step has consumed and the next
  step zeroes: backtracking allocates nothing.
``where='host'`` (``vp2o.trust_region.snapshot: host``) keeps the snapshot in pinned host memory,
filled by asynchronous copies on a side stream (`take(wait=False)` before the forward/backward,
`ready()` before the step: the pre-step state does not change in between) and read back only on a
reject, backtrack or freeze. Without CUDA, host and device are the same memory (plain CPU tensors).
`anchor_decision` evaluates D_anc (method §2.10) with sums and counts reduced over every rank of
every pipeline stage, so `decide` returns the same code everywhere; the caller reads it once.

Memory cost (persistent, allocated once, refreshed each step by one fused copy): the main
parameters (P_main x 4 bytes; P_main = P / DP with the distributed optimizer) plus the optimizer
state (2 x P_main x 4 bytes for Adam). No copy of the bf16 model parameters, none while
backtracking. E.g. bf16 + distributed optimizer: 12 P / DP bytes (was 2 P + 12 P / DP, plus
2 P + 4 P / DP while backtracking).

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


def _dedup(tensors) -> list:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def rebuild_model_params(optimizer) -> None:
    """Model parameters from the main parameters, as megatron does after a step: each mixed-precision
    optimizer's main-to-model copy, then (distributed optimizer) the parameter all-gather of every
    model chunk. FP32 optimizers (main = model parameter) have nothing to rebuild."""
    chunks = []
    for opt in _leaf_optimizers(optimizer):
        if hasattr(opt, "shard_fp32_groups") or hasattr(opt, "float16_groups"):
            opt._copy_main_params_to_model_params()
        if hasattr(opt, "shard_fp32_groups"):
            chunks += [c for c in getattr(opt, "model_chunks", []) if all(c is not k for k in chunks)]
    for chunk in chunks:
        chunk.start_param_sync(force_sync=True)


class ParamSnapshot:
    """Pre-step copy of the main parameters and optimizer state of one rank (module docstring).

    The copy lives in buffers allocated once (re-allocated only when the set of tensors changes,
    e.g. after Adam's lazy state init on the first step) and is refreshed by `take` with one
    ``torch._foreach_copy_``; ``params`` limits it to some model parameters (the freeze of
    inactive experts alone needs only the expert parameters and their optimizer state).
    ``where``: 'device' or 'host' (pinned host memory when CUDA is in use).
    """

    def __init__(self, model, optimizer, params=None, where: str = "device"):
        if where not in ("device", "host"):
            raise ValueError(f"snapshot where={where!r}: 'device' or 'host'")
        self.model, self.optimizer, self.where = model, optimizer, where
        self.params = list(model.parameters()) if params is None else list(params)
        wanted = {id(p) for p in self.params}
        self.entries = [e for e in main_param_entries(optimizer) if id(e[0]) in wanted]
        self.mains = _dedup(e[1] for e in self.entries)
        self._key, self._buffers, self.before = None, [], None
        self._stream = self._event = None

    def _live(self) -> tuple[list, list, dict]:
        """(tensors to copy, their (kind, ref) tags, non-tensor state values) as they are now."""
        states = _states(self.optimizer)
        tensors = [m.detach() for m in self.mains]
        tags = [("main", i) for i in range(len(self.mains))]
        scalars = {}
        for main in self.mains:
            state = states.get(main)
            if state is None:
                continue
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors.append(value)
                    tags.append(("state", id(main), key))
                else:
                    scalars[(id(main), key)] = value
        return tensors, tags, scalars

    def _empty_like(self, t: torch.Tensor) -> torch.Tensor:
        if self.where == "host" and t.device.type != "cpu":
            return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    def take(self, wait: bool = True) -> "ParamSnapshot":
        """Copy the current values into the snapshot buffers (one fused copy). On the host with CUDA
        the copy runs on a side stream; ``wait=False`` leaves it running (call `ready` before the
        parameters change: the optimizer step)."""
        tensors, tags, scalars = self._live()
        key = [(t.shape, t.dtype, t.device) for t in tensors], tags
        if key != self._key:
            self._buffers = [self._empty_like(t) for t in tensors]
            self._key = key
        if tensors:
            if self.where == "host" and tensors[0].is_cuda:
                self._stream = self._stream or torch.cuda.Stream()
                self._stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._stream):
                    for dst, src in zip(self._buffers, tensors):
                        dst.copy_(src, non_blocking=True)
                    self._event = torch.cuda.Event()
                    self._event.record()
            else:
                torch._foreach_copy_(self._buffers, tensors)
        self.before = dict(zip(tags, self._buffers))
        self.had_state = {id(m) for m in self.mains if m in _states(self.optimizer)}
        self.scalars = scalars
        if wait:
            self.ready()
        return self

    def ready(self) -> None:
        """The compute stream waits for an asynchronous host copy (no host sync)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None

    def nbytes(self) -> int:
        """Bytes the snapshot holds (its buffers)."""
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def _src(self, old: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return old.to(like.device, non_blocking=True) if old.device != like.device else old

    def capture_after(self) -> dict:
        """The post-step main parameters (for `scale_update`), held in the DDP gradient buffer (the
        step consumed it; the next step zeroes it); a clone where no fp32 gradient view exists."""
        after = []
        for main in self.mains:
            entry = next(e for e in self.entries if e[1] is main)
            grad = getattr(entry[0], "main_grad", None)
            if grad is not None and grad.dtype == main.dtype:
                view = grad.view(-1)[entry[2][0]:entry[2][1]] if entry[2] is not None else grad.view(main.shape)
                if view.data_ptr() != main.data_ptr():
                    view.copy_(main.detach().view(view.shape))
                    after.append(view.view(main.shape))
                    continue
            after.append(main.detach().clone())
        return {"main": after}

    def restore(self, mask_of=None) -> None:
        """Put back the snapshot; with ``mask_of(model_param) -> bool mask | None`` only there
        (masked restores leave scalar state such as Adam's step count alone). The model parameters
        are rebuilt from the restored main parameters."""
        self.ready()
        with torch.no_grad():
            if mask_of is None:
                self._restore_all()
            else:
                for e in self.entries:
                    i = next(j for j, m in enumerate(self.mains) if m is e[1])
                    mask = _main_mask(e, mask_of)
                    if mask is not None:
                        _put_masked(e[1], self._src(self.before[("main", i)], e[1]), mask)
                states = _states(self.optimizer)
                for e in self.entries:
                    if id(e[1]) not in self.had_state:
                        continue
                    mask = _main_mask(e, mask_of)
                    for key, cur in states[e[1]].items():
                        old = self.before.get(("state", id(e[1]), key))
                        if old is not None and torch.is_tensor(cur) and cur.dim() > 0 and cur.shape == old.shape:
                            _put_masked(cur, self._src(old, cur), mask)
            rebuild_model_params(self.optimizer)

    def _restore_all(self) -> None:
        states = _states(self.optimizer)
        dst, src = [], []
        for i, main in enumerate(self.mains):
            dst.append(main.detach())
            src.append(self.before[("main", i)])
        for main in self.mains:
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
                    state[key] = old.clone().to(state[key].device if torch.is_tensor(state[key]) else old.device)
        if dst:
            if any(d.device != s.device for d, s in zip(dst, src)):
                for d, s in zip(dst, src):
                    d.copy_(s, non_blocking=True)
            else:
                torch._foreach_copy_(dst, src)

    def scale_update(self, after: dict, scale: float) -> None:
        """Main parameters <- before + scale (after - before), model parameters rebuilt (method §2.10)."""
        self.ready()
        with torch.no_grad():
            for i, (main, new) in enumerate(zip(self.mains, after["main"])):
                main.copy_(tr.scaled_update(self._src(self.before[("main", i)], main), new, scale))
            rebuild_model_params(self.optimizer)


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
    """D_anc over all layers, tokens and ranks (method §2.10), identical on every rank.

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
        counted_T = torch.cat([c[2] for c in layer.captured])  # response tokens (method §2.10)
        entry = (topk_TK, gates_TK, layer.protos_ED, anchor[1], anchor[2], anchor[0], counted_T)
        batches.setdefault(tuple(tuple(t.shape) for t in entry), []).append(entry)
    for entries in batches.values():
        topk, gates, protos, anc_topk, anc_gates, anc_protos, counted = (torch.stack(ts) for ts in zip(*entries))
        total, count = tr.anchor_distance_sum(topk, gates, protos, anc_topk, anc_gates, anc_protos, counted)
        sums += torch.stack([total.double(), count.double()])
    total, count = world_sum(sums).unbind()
    return total / count.clamp_min(1.0)

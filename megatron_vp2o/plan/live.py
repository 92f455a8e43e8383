"""Measure what a live 1-rank run of a config holds, row by row, for ``vp2o plan --check``.

What: the same rows as :mod:`.memory`, measured on the objects of a real run in a 1-process world
on this machine (``distributed.init.init_parallel``, ``training.setup.build_trainable``: the
trainer's own builder) around one real learner step (after a first one, so Adam's state exists:
the steady state), never recomputed from the plan's formulas:

* ``params`` / ``grads`` / ``optimizer``: bytes of the model parameters, of their DDP ``main_grad``
  buffers, and of the optimizer's fp32 masters (those that are not the parameters themselves) and
  state tensors (Adam's moments and steps).
* ``tr_snapshot``: the buffers of every ``ParamSnapshot`` (``distributed.trust_region``) alive in the
  process that copies this optimizer (found by the garbage collector, not asked of the learner).
* ``prototypes``: the registered buffers of the model's VP2O MoE layers plus the most bytes of copies
  of those buffers alive at once during the step (the anchor's prototypes, the trust region's old
  prototypes, ...): every ``clone`` / ``_to_copy`` whose input is such a buffer, seen by
  :class:`AllocationTracker` (a ``TorchDispatchMode``).
* ``stein``: the most bytes alive at once among the storages allocated between the learner's
  ``pre_stein`` and ``post_stein`` probes (the Stein hook, ``distributed.stein_hook.apply_stein``).
* ``routing``: what the MoE layers hold beyond parameters and buffers after the step (every tensor
  reachable from the layer objects' attributes: routing captures, loss log, active set), plus the
  tensors the learner returns for the loop to keep (the anchor's top-k, gates and counted tokens)
  that are not prototype copies.
* ``routing_stats``: what the layers hold after the training forwards of the step's micro-batches
  (statistics reset first, as the step does), minus what they hold after the step: the
  statistics pending until the fold-in after the backward.
* ``activations`` (``model.recompute: none``), ``activations_selective``, ``activations_recompute``
  (``full``): the distinct non-parameter storages autograd saves (``saved_tensors_hooks``) in the
  forward of one learner micro-batch through the policy loss, plus the most bytes those saved
  during the backward (the recompute forwards) hold at once.

GRPO runs the same measurements on its own learner step: its snapshot, prototypes, Stein and
routing rows must come out 0 (no ``ParamSnapshot``, no VP2O layer, no Stein phase). :func:`check`
compares the rows with ``plan_rank(cfg, 1)`` (``TOLERANCE``; activations after adding
:func:`cpu_extra_bytes`).

``plan`` sits below ``rl``, so the learner comes from the caller (:class:`RLHooks`; the CLI builds it
from ``rl.learner``). Shapes of the batches: whatever the hooks make (``rl.micro_batch_size`` x
``model.seq_length`` tokens per micro-batch, the plan's assumption).

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_vp2o.distributed.init import init_parallel
from megatron_vp2o.distributed.trust_region import ParamSnapshot, main_param_entries
from megatron_vp2o.moe.layer import ResponseMaskedMoELayer, vp2o_layers, vp2o_moe_layer
from megatron_vp2o.training.setup import build_trainable

RECOMPUTE_ROWS = {"none": "activations", "selective": "activations_selective", "full": "activations_recompute"}
# relative tolerance per checked row: the static rows are exact; the Stein peak leaves out the E x E
# masks and kernels; activations leave out RoPE tables, router indices and the like
TOLERANCE = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "tr_snapshot": 0.0, "prototypes": 0.0, "routing": 0.0,
             "stein": 0.02, "routing_stats": 0.0, **{row: 0.05 for row in RECOMPUTE_ROWS.values()}}
# rows a CPU-only 1-rank run does not measure, and why
UNMEASURED = {"backtrack": "0 by design: the post-step mains wait in the consumed gradient buffer",
              "kv_cache": "the rollout engine is not built", "host_optimizer": "no host/device split without CUDA",
              "host_snapshot": "no host/device split without CUDA", "vllm_weights": "the rollout engine is not built",
              "vllm_kv": "the rollout engine is not built", "host_vllm": "the rollout engine is not built"}
_COPIES = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}


@dataclass(frozen=True)
class RLHooks:
    """The learner, supplied by the caller (``rl`` sits above ``plan``)."""

    batches: Callable  # (cfg) -> one step's learner micro-batches
    forward_step: Callable  # (cfg) -> megatron forward_step_func with the policy loss
    # (cfg, trainable) -> a learner whose step(batches, probe) runs one learner step and returns what
    # the RL loop keeps until the next (the anchors); probe(stage) at "pre_stein" / "post_stein"
    learner: Callable


def nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class AllocationTracker(TorchDispatchMode):
    """The most bytes alive at once among the storages that ops run under it allocate (``keep(func,
    inputs)`` selects the ops; default: all). A storage counts from the op that returns it until
    it is freed (a weak reference on the storage)."""

    def __init__(self, keep=None):
        super().__init__()
        self.keep, self.live, self.peak, self.owned = keep, 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self.keep is None or self.keep(func, inputs):
            known = {t.untyped_storage().data_ptr() for t in inputs}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.add(t.untyped_storage(), known)
        return out

    def add(self, storage, known: set) -> None:
        """Count ``storage`` from now until it is freed (unless it is one of ``known`` or already counted)."""
        ptr, size = storage.data_ptr(), storage.nbytes()
        if not size or ptr in known or ptr in self.owned:
            return
        self.owned[ptr] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.live -= self.owned.pop(ptr, 0)


def _layer_cls(cfg):
    return vp2o_moe_layer(cfg.vp2o.specialization) if _is_vp2o(cfg) else ResponseMaskedMoELayer


def _is_vp2o(cfg) -> bool:
    return cfg.rl.algo == "vp2o" and cfg.vp2o.enabled


def _trainable(cfg):
    lr = cfg.rl.resolved_lr
    if lr is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr, min_lr=lr, warmup_steps=0))
    return build_trainable(cfg, moe_layer_cls=_layer_cls(cfg))


def static_rows(trainable) -> dict:
    """params / grads / optimizer / tr_snapshot bytes held now (module docstring)."""
    params = list(trainable.module.parameters())
    storages = {p.untyped_storage().data_ptr() for p in params}
    masters = [m for _, m, _ in main_param_entries(trainable.optimizer)
               if m.untyped_storage().data_ptr() not in storages]
    state = [v for opt in getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer])
             for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    gc.collect()
    snaps = [o for o in gc.get_objects() if isinstance(o, ParamSnapshot) and o.optimizer is trainable.optimizer]
    return {"params": nbytes(params), "grads": nbytes(p.main_grad for p in params),
            "optimizer": nbytes(masters) + nbytes(state), "tr_snapshot": sum(s.nbytes() for s in snaps)}


def held_tensors(obj, skip=(), depth: int = 4) -> list:
    """Tensors reachable from ``obj``'s attributes (lists, tuples, dicts, deques), ``skip`` names
    left out; a module's parameters, buffers and submodules are not attributes here."""
    found = []

    def walk(value, level):
        if torch.is_tensor(value):
            found.append(value)
        elif level < depth and (isinstance(value, (list, tuple)) or hasattr(value, "maxlen")):
            for item in value:
                walk(item, level + 1)
        elif level < depth and isinstance(value, dict):
            for item in value.values():
                walk(item, level + 1)

    for name, value in vars(obj).items():
        if name not in skip and name not in ("_parameters", "_buffers", "_modules"):
            walk(value, 0)
    return found


class SavedTracker:
    """Bytes autograd saves for backward (``saved_tensors_hooks``): the distinct non-parameter
    storages the forward saves, and the most bytes alive at once among the storages saved during
    the backward (megatron's recompute forwards) that the forward had not saved."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.forward, self.in_backward = {}, False
        self.backward = AllocationTracker()

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.params or not storage.nbytes():
            return t
        if not self.in_backward:
            if ptr not in self.forward:
                self.forward[ptr] = storage.nbytes()
                weakref.finalize(storage, self.forward.pop, ptr, None)
        elif ptr not in self.forward:
            self.backward.add(storage, set())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def activation_bytes(cfg, hooks: RLHooks, mode: str) -> int:
    """What one learner micro-batch saves for backward with ``model.recompute=mode`` (module docstring)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, recompute=mode))
    trainable = _trainable(cfg)
    batch = hooks.batches(cfg)[0]
    tracker = SavedTracker(trainable.module.parameters())
    with tracker.hooks():
        out, loss_func = hooks.forward_step(cfg)(iter([batch]), trainable.model)
        loss = loss_func(out)[0]
        forward = sum(tracker.forward.values())
        del out
        tracker.in_backward = True
        loss.backward()
    return forward + tracker.backward.peak


def learner_rows(cfg, hooks: RLHooks) -> dict:
    """Every static row and ``routing_stats`` (module docstring), measured around one real learner
    step of ``cfg`` (after a first one: the steady state) in the current 1-rank world."""
    trainable = _trainable(cfg)
    batches = hooks.batches(cfg)
    layers = vp2o_layers(trainable.model)
    buffers = [b for layer in layers for b in layer.buffers()]
    ptrs = {b.untyped_storage().data_ptr() for b in buffers}
    copies = AllocationTracker(keep=lambda func, inputs: func in _COPIES and any(
        t.untyped_storage().data_ptr() in ptrs for t in inputs))
    stein = AllocationTracker()

    def probe(stage, state=None):
        if stage == "pre_stein":
            stein.__enter__()
        elif stage == "post_stein":
            stein.__exit__(None, None, None)

    learner = hooks.learner(cfg, trainable)
    learner.step(batches)  # warm-up: Adam's state exists from the first step on (the snapshot copies it)
    with copies:
        kept = learner.step(batches, probe)  # held, as the RL loop holds it, until we return
    kept_routing = [t for t in tree_leaves(kept) if torch.is_tensor(t)
                    and t.untyped_storage().data_ptr() not in copies.owned]
    rows = static_rows(trainable)
    rows["prototypes"] = nbytes(buffers) + copies.peak
    rows["stein"] = stein.peak
    masked = [m for m in trainable.module.modules() if isinstance(m, ResponseMaskedMoELayer)]
    held = _held_bytes(masked)
    rows["routing"] = held + nbytes(kept_routing)
    rows["routing_stats"] = _forwards(cfg, hooks, trainable, batches, masked) - held
    return rows


def _held_bytes(layers) -> int:
    return nbytes(t for layer in layers for t in held_tensors(layer))


def _forwards(cfg, hooks: RLHooks, trainable, batches, layers) -> int:
    """What the MoE layers hold after the training forwards of one step, in the step's own order
    (statistics reset, then every micro-batch), before the fold-in after the backward."""
    for layer in vp2o_layers(trainable.model):
        layer.reset_step_stats()
    forward_step = hooks.forward_step(cfg)
    for batch in batches:
        out, _ = forward_step(iter([batch]), trainable.model)
        del out
    held = _held_bytes(layers)
    for layer in vp2o_layers(trainable.model):
        layer.reset_step_stats()
    return held


def cpu_extra_bytes(cfg, mode: str) -> int:
    """What the CPU path saves for backward on top of the plan's activation rows, which assume the
    GPU's fused kernels: megatron's ``SequentialMLP`` experts (``model.expert_impl: sequential``) run
    the SwiGLU unfused and keep two more F-wide copies per routed token and MoE layer; the local
    backend's RMSNorm (``model/norm.py``) computes in fp32 and keeps its input and normalised input as
    fp32, ``(8 - 2a) D`` bytes per token and norm more than the plan's two ``a D`` (0 in fp32).
    ``mode`` (``model.recompute``): none -- every layer of the micro-batch; full -- the one layer
    recomputed in the backward (and the final norm); selective -- the one MoE block recomputed in
    the backward (norms are never recomputed)."""
    model, par = cfg.model, cfg.parallel
    a = {"fp32": 4, "bf16": 2}[model.params_dtype]
    tokens = cfg.rl.micro_batch_size * model.seq_length // (par.tp * par.cp)
    swiglu = 0
    if model.expert_impl == "sequential" and model.swiglu:
        swiglu = tokens * a * model.moe_router_topk * 2 * model.moe_ffn_hidden_size // par.expert_tp
    norm = tokens * (8 - 2 * a) * model.hidden_size
    layers = model.num_layers // par.pp
    moe_layers = sum(1 for i in range(layers) if i % model.moe_layer_freq == 0)
    if mode == "none":
        return moe_layers * swiglu + (2 * layers + 1) * norm
    if mode == "full":
        return swiglu + 3 * norm
    return swiglu + (2 * layers + 1) * norm


@dataclass(frozen=True)
class CheckRow:
    algo: str  # rl.algo of the measured run
    row: str  # a plan row (memory.ROWS)
    plan: int  # the plan's bytes (+ extra)
    live: int  # bytes measured on the live objects
    extra: int = 0  # what the CPU path saves on top of the plan (activations: cpu_extra_bytes)

    @property
    def ok(self) -> bool:
        return abs(self.live - self.plan) <= TOLERANCE[self.row] * max(self.plan, self.live)


def check(cfg, hooks: RLHooks, algos=("vp2o", "grpo")) -> list[CheckRow]:
    """Measure ``cfg`` for each of ``algos`` (``rl.algo`` overridden, all else equal) in a 1-rank
    world on this machine and compare every measured row with ``plan_rank(cfg, 1)``."""
    from megatron_vp2o.plan.memory import plan_rank

    init_parallel(cfg, sft_batch=False)
    out = []
    for algo in algos:
        run = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, algo=algo))
        plan = plan_rank(run, 1).bytes
        live = learner_rows(run, hooks)
        out += [CheckRow(algo, row, plan[row], live[row]) for row in TOLERANCE if row in live]
        for mode, row in RECOMPUTE_ROWS.items():
            extra = cpu_extra_bytes(run, mode)
            out.append(CheckRow(algo, row, plan[row] + extra, activation_bytes(run, hooks, mode), extra))
        gc.collect()
    return out

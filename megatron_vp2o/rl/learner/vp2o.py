"""The VP2O learner on megatron-core: one learner step per RL step (method §2.4-2.13).

``VP2OLearner`` is the RL loop's ``Learner`` (``rl.learner.outcome``) for ``rl.algo=vp2o``; the
step itself, ``vp2o_train_step``, also runs alone (distributed parity tests, bench/bench_step.py).

Phases, in order (each timed into ``timing/<phase>`` with ``monitor.timing.timed``):
1. ``forward_backward`` -- megatron's ``get_forward_backward_func`` over the micro-batches; the
   VP2O MoE layers keep their routing masks (co-activation counts, folded in once per step by
   `moe.layer.flush_step_stats`), capture top-k/gates and add the specialisation losses
   (normalised globally: `set_loss_normalizers`);
2. ``stein`` -- the gradient transport in the DDP grad buffers (`distributed.stein_hook`);
3. ``optimizer`` -- snapshot (trust region + freeze), ``optimizer.step()``, restore of the
   experts outside the active set (method §2.8 `freeze_inactive`), prototype refresh (method §2.4);
4. ``trust_region`` -- D_anc against the anchor (method §2.10) with accept / backtrack (1/2, 1/4,
   1/8) / reject / refresh, one decision on every rank. The refresh rule (method §2.12) is not
   applied here: the caller applies it once per step (`rl.trainer.refresh_decision`), reading
   the outcome's ``anchor_failed`` (decision reject / refresh).
Returns metrics (method §2.13) as Python numbers (one host read at the end: `vp2o_report`); the
decision code and the D_anc trace of the last step stay on the ``VP2OState``.

``anchors``: per local VP2O layer (anchor prototypes [E, D], anchor top-k [T, K], gates [T, K])
with this rank's tokens in forward order; None skips the anchor budget.

Shape legend: E experts, D hidden, T tokens of this rank (all micro-batches), K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vp2o.device import device
from megatron_vp2o.algo import trust_region as tr
from megatron_vp2o.distributed.reductions import VP2OGroups, all_reduce_, refresh_prototypes
from megatron_vp2o.distributed.stein_hook import apply_stein
from megatron_vp2o.distributed.trust_region import ParamSnapshot, anchor_statistic
from megatron_vp2o.monitor.timing import timed
from megatron_vp2o.moe.layer import flush_step_stats, start_grad_probe, stop_grad_probe, vp2o_layers
from megatron_vp2o.platform import native
from megatron_vp2o.rl.learner.epochs import applied, epoch_steps, mean_of, skip_summary
from megatron_vp2o.rl.learner.forward import grads_finite, ratio_stats, recording_ratios
from megatron_vp2o.rl.learner.outcome import StepOutcome
from megatron_vp2o.rl.learner.vp2o_report import loss_grad_metrics, step_report, to_host
from megatron_vp2o.training.step import lm_forward_step, reduce_report


@dataclass
class VP2OState:
    """Learner-side VP2O state kept between steps."""

    cfg: object  # megatron_vp2o.config.VP2OConfig
    groups: VP2OGroups
    layers: list
    counters: dict = field(default_factory=lambda: {name: 0 for name in tr.DECISION_NAMES})
    snapshot: object = None  # the ParamSnapshot reused across steps (its buffers are allocated once)
    snapshot_key: tuple = ()
    decision: int = tr.ACCEPT  # the last step's trust-region decision code (ACCEPT when skipped or off)
    d_anc_trace: list = field(default_factory=list)  # the last step's D_anc per attempt (method §2.10)


class NoVP2OLayers(RuntimeError):
    """A VP2O run whose built model has no VP2O MoE layer: every VP2O part would silently do nothing."""


def require_vp2o_layers(model, layers) -> None:
    """Refuse to run VP2O on a pipeline stage that has MoE layers but none of them is a VP2O layer
    (e.g. a megatron-core spec form the swap does not know, compat row 1). Stages without any MoE
    layer (a dense first pipeline stage) are fine; a whole model without MoE is refused too."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_vp2o import compat

    module = model.module if hasattr(model, "module") else model
    moe = [m for m in module.modules() if isinstance(m, MoELayer)]
    if moe and len(layers) == len(moe):
        return
    if moe or ps.get_pipeline_model_parallel_world_size() == 1:  # (a dense stage of a pipeline is fine)
        kinds = sorted({type(m).__name__ for m in moe}) or ["no MoE layer"]
        raise NoVP2OLayers(
            f"rl.algo=vp2o: the built model has {len(layers)} VP2O MoE layers of {len(moe)} MoE layers ({', '.join(kinds)}) "
            f"on megatron-core {compat.MCORE_VERSION}; VP2O would do nothing. Build through "
            "megatron_vp2o.model.spec (see megatron_vp2o/compat.py) or run rl.algo=grpo")


def init_vp2o(trainable, cfg, sequence_parallel: bool, init_prototypes: bool = True) -> VP2OState:
    """Find the VP2O layers, build the groups, initialise prototypes (30 power steps, method §2.4)."""
    groups = VP2OGroups.from_parallel_state(sequence_parallel)
    layers = vp2o_layers(trainable.model)
    require_vp2o_layers(trainable.model, layers)
    for layer in layers:
        layer.spec_cfg = cfg.specialization
    if init_prototypes:
        refresh_prototypes(layers, groups, cfg.stein.init_power_iters, from_start=True)
    else:  # loaded from a checkpoint: only the EP all-gather
        refresh_prototypes(layers, groups, 0)
    return VP2OState(cfg, groups, layers)


def global_token_counts(micro_batches) -> tuple[float, float]:
    """(LM loss count N, routed tokens T per layer) over micro-batches and DP x CP ranks. N is the
    count megatron divides the gradients by: loss tokens, or ``mb.loss_count`` when the batch says
    otherwise (the RL policy loss averages over sequences). T counts the response tokens of RL
    batches (their forward step masks the rest out of the VP2O statistics), else every token."""
    counts = torch.zeros(2, dtype=torch.float64, device=device())  # a collective: on the device
    for mb in micro_batches:
        rl = hasattr(mb, "loss_count")  # RL batches: the layers count response tokens only (rl.learner.forward)
        n = mb.loss_count if rl else mb.loss_mask.sum()
        routed = mb.loss_mask.sum() if rl else mb.tokens.numel()
        counts += torch.tensor([float(n), float(routed)], dtype=torch.float64, device=counts.device)
    all_reduce_(counts, ps.get_data_parallel_group(with_context_parallel=True))
    return float(counts[0]), float(counts[1])


def set_loss_normalizers(layers, lm_tokens: float, routed_tokens: float) -> None:
    """Per-layer (N / (K T), N / T): the gradient of coef * global_sum / global_count (CONTRIBUTING.md §9)."""
    for layer in layers:
        layer.loss_norm = (lm_tokens / (layer.top_k * routed_tokens), lm_tokens / routed_tokens)


def _forward_backward(trainable, micro_batches, forward_step) -> list:
    for m in trainable.models:
        m.zero_grad_buffer()
    trainable.optimizer.zero_grad()
    mb = micro_batches[0]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=trainable.models,
        num_microbatches=len(micro_batches), seq_length=mb.tokens.shape[1],
        micro_batch_size=mb.tokens.shape[0], forward_only=False)


def _freeze_mask(layers):
    """mask_of(param): elements of experts outside the active set (method §2.8), else None."""
    owner = {id(p.param): layer for layer in layers for p in layer.accessor.params}

    def mask_of(param):
        layer = owner.get(id(param))
        if layer is None:
            return None
        off, n = layer.expert_offset, layer.num_local_experts
        return layer.accessor.element_mask(param, ~layer.active_E[off:off + n])
    return mask_of


def _snapshot(trainable, state, trust_region: bool) -> "ParamSnapshot | None":
    """The pre-step snapshot: everything when the trust region runs this step, the expert
    parameters when only the freeze needs it, nothing otherwise."""
    cfg = state.cfg
    freeze = cfg.stein.enabled and cfg.stein.freeze_inactive
    if not (trust_region or freeze):
        return None
    params = None if trust_region else [p.param for layer in state.layers for p in layer.accessor.params]
    key = (id(trainable.optimizer), params is None)
    if state.snapshot is None or state.snapshot_key != key:
        state.snapshot = ParamSnapshot(trainable.model, trainable.optimizer, params, where=cfg.trust_region.snapshot)
        state.snapshot_key = key
    return state.snapshot.take()


def _freeze_inactive(state, snap) -> None:
    """Restore the experts outside the active set (method §2.8) -- one host read of the active masks;
    nothing to do in the common step where every expert got tokens."""
    layers = state.layers
    if bool(torch.stack([layer.active_E for layer in layers]).all()):
        return
    snap.restore(_freeze_mask(layers))


def _capture_routing(trainable, micro_batches, layers, forward_step) -> None:
    """One forward-only pass of the current weights over ``micro_batches`` with every layer's step
    statistics reset and its routing captured (``layer.captured``)."""
    for layer in layers:
        layer.reset_step_stats()
        layer.capture = True
    mb = micro_batches[0]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=trainable.models,
            num_microbatches=len(micro_batches), seq_length=mb.tokens.shape[1],
            micro_batch_size=mb.tokens.shape[0], forward_only=True)


def anchor_batches(micro_batches, state: VP2OState) -> list:
    """The micro-batches D_anc is measured on (``vp2o.trust_region.anchor_micro_batches``: 0 = all,
    n = the first n): the anchor's capture and the post-step re-route use the same ones."""
    n = state.cfg.trust_region.anchor_micro_batches
    return list(micro_batches) if n == 0 else list(micro_batches)[:n]


def route_after_step(trainable, micro_batches, state: VP2OState, forward_step=lm_forward_step) -> None:
    """Re-route this step's tokens with the weights as they are now (after the optimizer step or a
    backtrack), so D_anc judges a step by the gates it produces (method §2.10), not by those of the
    forward before it. One forward-only pass; the step's statistics (co-activation counts, loss log)
    are kept, only ``layer.captured`` is replaced."""
    layers = state.layers
    kept = [(layer.counts_EE.clone(), layer.loss_log.clone()) for layer in layers]
    _capture_routing(trainable, anchor_batches(micro_batches, state), layers, forward_step)
    for layer, (counts_EE, loss_log) in zip(layers, kept):
        captured = layer.captured
        layer.reset_step_stats()
        layer.counts_EE.copy_(counts_EE)
        layer.loss_log, layer.captured = loss_log, captured


def _trust_region(state, snap, old_protos, anchors, reroute) -> tuple[int, float, int]:
    """Anchor budget loop (method §2.10): returns (decision, D_anc, backtracks). ``reroute()``
    captures the current weights' gates before each D_anc (a megatron forward: outside
    ``native()``, which wraps only VP2O's own tensor work here)."""
    cfg = state.cfg.trust_region
    scales = cfg.backtrack_scales

    def judge() -> float:
        reroute()
        with native():
            d_anc = float(anchor_statistic(state.layers, anchors))
        state.d_anc_trace.append(d_anc)
        return d_anc

    def restore_prototypes(power_iters: int) -> None:
        for layer, old in zip(state.layers, old_protos):
            layer.protos_XD.copy_(old)
        refresh_prototypes(state.layers, state.groups, power_iters)

    state.d_anc_trace = []
    d_anc = judge()
    attempt = 0
    decision = int(tr.decide(d_anc <= cfg.anchor_delta, attempt, cfg.on_violation, len(scales)))
    with native():
        after = snap.capture_after() if decision == tr.BACKTRACK else None
    while decision == tr.BACKTRACK:
        with native():
            snap.scale_update(after, scales[attempt])
            restore_prototypes(state.cfg.stein.power_iters)
        d_anc = judge()
        attempt += 1
        decision = int(tr.decide(d_anc <= cfg.anchor_delta, attempt, cfg.on_violation, len(scales)))
        if decision == tr.ACCEPT:
            return tr.BACKTRACK, d_anc, attempt
    if decision == tr.REJECT:
        with native():
            snap.restore()
            restore_prototypes(0)
    return decision, d_anc, attempt


def capture_anchors(trainable, micro_batches, state: VP2OState, forward_step=lm_forward_step) -> list:
    """Anchor inputs from a forward-only pass of the current model (what actors log at a refresh):
    per layer (prototypes [E, D], top-k [T, K], gates [T, K], counted tokens [T] bool), over the
    micro-batches of `anchor_batches`."""
    _capture_routing(trainable, anchor_batches(micro_batches, state), state.layers, forward_step)
    anchors = [(layer.protos_ED.clone(), torch.cat([c[0] for c in layer.captured]),
                torch.cat([c[1] for c in layer.captured]), torch.cat([c[2] for c in layer.captured]))
               for layer in state.layers]
    for layer in state.layers:
        layer.reset_step_stats()
    return anchors


def vp2o_train_step(trainable, micro_batches, state: VP2OState, forward_step=lm_forward_step,
                    anchors=None, probe=None, guard=None, grad_probe: bool = False) -> dict:
    """One learner step (module docstring). ``probe(stage, state)`` is called at "pre_stein" and
    "post_stein" (tests); ``guard(trainable)`` runs after the backward: False (non-finite loss or
    gradients) skips the step, weights unchanged. ``grad_probe``: the loss-gradient diagnostic on the
    first micro-batch (`spec/grad_norm_*`: `vp2o_report.loss_grad_metrics`); the step is unchanged."""
    cfg, layers, timing = state.cfg, state.layers, {}
    state.decision, state.d_anc_trace = tr.ACCEPT, []
    with timed(timing, "forward_backward"):
        lm_tokens, routed_tokens = global_token_counts(micro_batches)
        set_loss_normalizers(layers, lm_tokens, routed_tokens)
        for layer in layers:
            layer.reset_step_stats()
            layer.capture = anchors is not None
        probing = grad_probe and start_grad_probe(layers)
        try:
            losses = _forward_backward(trainable, micro_batches, forward_step)
        finally:
            stop_grad_probe(layers)
        flush_step_stats(layers)
        if anchors is not None and cfg.trust_region.anchor_micro_batches:  # pre_step gates: the anchor's micro-batches
            for layer in layers:
                layer.captured = layer.captured[:cfg.trust_region.anchor_micro_batches]
        grad_metrics = loss_grad_metrics(layers, cfg.specialization, lm_tokens) if probing else {}
    with timed(timing, "stein"):  # the guard's all-reduce counts here; a skipped step logs forward_backward only
        if guard is not None and not guard(trainable):
            trainable.optimizer.zero_grad()
            loss_sum, count = reduce_report(losses).tolist()
            return {"loss": loss_sum / max(count, 1.0), "skipped": True,
                    "skip_reason": "non-finite loss or gradient", **timing}
        if probe is not None:
            probe("pre_stein", state)
        with native():
            metrics = apply_stein(trainable.model, layers, state.groups, cfg.stein, routed_tokens) \
                if cfg.stein.enabled else {}
        if probe is not None:
            probe("post_stein", state)
    trust_region = cfg.trust_region.enabled and anchors is not None
    with timed(timing, "optimizer"):
        snap, old_protos, applied = _optimizer_step(trainable, state, trust_region)
    with timed(timing, "trust_region"):
        if trust_region:
            reroute = (lambda: route_after_step(trainable, micro_batches, state, forward_step)) \
                if cfg.trust_region.anchor_gates == "post_step" else (lambda: None)
            decision, d_anc, backtracks = _trust_region(state, snap, old_protos, anchors, reroute)
            applied |= {"decision": decision, "d_anc": d_anc, "backtracks": backtracks}
        trainable.scheduler.step(increment=1)
    state.decision = applied["decision"]
    return step_report(state, losses, metrics | grad_metrics, applied, timing)


def _optimizer_step(trainable, state: VP2OState, trust_region: bool):
    """Snapshot, ``optimizer.step()``, freeze of the inactive experts (method §2.8), prototype refresh
    (method §2.4): (snapshot, prototypes before the step, what was applied so far)."""
    cfg, layers = state.cfg, state.layers
    with native():
        snap = _snapshot(trainable, state, trust_region)
        old_protos = [layer.protos_XD.clone() for layer in layers] if trust_region else []
    update_ok, grad_norm, _ = trainable.optimizer.step()
    with native():
        if cfg.stein.enabled and cfg.stein.freeze_inactive:
            _freeze_inactive(state, snap)
        refresh_prototypes(layers, state.groups, cfg.stein.power_iters)
    applied = {"decision": tr.ACCEPT, "d_anc": float("nan"), "backtracks": 0, "grad_norm": grad_norm,
               "update_ok": update_ok}
    return snap, old_protos, applied


class VP2OLearner:
    """``Learner`` for ``rl.algo=vp2o``: anchors captured at each refresh (when the anchor budget is
    on: ``anchor_budget``), one VP2O step per update -- or, when ``loop`` (``rl.vp2o``) asks for more
    than one, its mini-batch epochs of VP2O steps without the anchor budget (``rl.learner.epochs``)."""

    def __init__(self, trainable, state: VP2OState, forward_step, loop=None, group_size: int = 1,
                 anchor_budget: bool = True, loss_grad_every: int = 0):
        self.trainable, self.state, self.forward_step = trainable, state, forward_step
        self.loop, self.group_size, self.anchor_budget = loop, group_size, anchor_budget
        self.loss_grad_every = loss_grad_every  # logging.loss_grad_every: the loss-gradient diagnostic

    def _probe_due(self) -> bool:
        """The loss-gradient diagnostic runs in updates that start at an optimizer step count divisible
        by ``loss_grad_every`` (the scheduler's count: checkpointed, so a resumed run probes the same steps)."""
        every = self.loss_grad_every
        return every > 0 and getattr(self.trainable.scheduler, "num_steps", 0) % every == 0

    @property
    def single_step(self) -> bool:
        return self.loop is None or self.loop.mini_batches * self.loop.epochs == 1

    def anchors(self, batches: list) -> list | None:
        """The refresh's anchors (method §2.10), or None where no anchor budget will judge a step."""
        if not (self.anchor_budget and self.state.cfg.trust_region.enabled):
            return None
        return capture_anchors(self.trainable, batches, self.state, forward_step=self.forward_step)

    def step(self, batches: list, anchors: list | None) -> StepOutcome:
        """The update; ``policy/ratio_*`` over every micro-batch of its steps (`forward.ratio_stats`:
        one more host read of three numbers)."""
        with recording_ratios(self.trainable.models) as ratios:
            raw = self._steps(batches, anchors)
        raw |= to_host(ratio_stats(ratios))
        return StepOutcome.from_metrics(raw, "vp2o", decision=self.state.decision)

    def _steps(self, batches: list, anchors: list | None) -> dict:
        probe = self._probe_due()
        if self.single_step:
            return vp2o_train_step(self.trainable, batches, self.state, forward_step=self.forward_step,
                                   anchors=anchors, guard=grads_finite, grad_probe=probe)
        if anchors is not None:  # refused by the `vp2o train` pre-flight (cli/checks.py)
            raise ValueError("rl.vp2o.mini_batches x rl.vp2o.epochs > 1 runs without the anchor budget, which "
                             "judges one step on the whole buffer; set vp2o.trust_region.enabled=false or "
                             "rl.ablate.anchor_budget=false")

        left = [self.loop.mini_batches * self.loop.epochs]

        def step(micro_batches) -> dict:
            left[0] -= 1  # the diagnostic in the last step: the update logs the last step's diagnostics
            return vp2o_train_step(self.trainable, micro_batches, self.state, forward_step=self.forward_step,
                                   anchors=None, guard=grads_finite, grad_probe=probe and left[0] == 0)

        outs = epoch_steps(step, batches, self.loop, self.group_size)
        done = applied(outs)
        return dict(done[-1]) | mean_of(done, ("loss",)) | skip_summary(outs)  # the last step's diagnostics

"""`VP2OMoELayer`: megatron-core's MoELayer plus the per-expert state and captures VP2O needs.

What (method §2.4, 2.5, 2.9, 2.10): a subclass of ``MoELayer`` chosen through the layer spec
(``build_trainable(cfg, moe_layer_cls=VP2OMoELayer)``) that keeps
- ``protos_XD`` persistent buffer: the unit prototypes of the X local experts (checkpointed as a
  ShardedTensor split over EP, so it reshards); ``protos_ED`` non-persistent: all E prototypes of
  the layer after the EP all-gather (`distributed.reductions.refresh_prototypes`);
- ``counts_EE`` non-persistent: raw co-activation pair counts summed over micro-batches (the
  Stein hook reduces them over ranks), folded in by each training forward together with the
  router entropy (``loss_log``), so no micro-batch's masks or logits outlive its forward; the
  specialisation losses' values wait as scalars until `flush_step_stats` (the VP2O step calls it
  after the backward, before reading ``loss_log``);
- captures of each training micro-batch: top-k indices and top-k gates [T, K] (barycenters),
  with T in megatron's sequence-major order [S*B];
- the specialisation losses (method §2.9), attached to the output with megatron's
  ``MoEAuxLossAutoScaler`` and logged through ``save_to_aux_losses_tracker``.

Stages overridden (megatron 0.16.1 ``route -> preprocess -> dispatch -> routed_experts_compute ->
combine -> postprocess``): ``route`` (`ResponseMaskedMoELayer`, the base class GRPO runs too: the
router's aux losses see the response tokens only; VP2O's ``_route_tokens`` calls the router's own forward
through `VP2OTopKRouter`, which also keeps the logits for the full softmax p and to capture
top-k/gates), ``postprocess`` (losses). With
``ortho_coef > 0`` also ``preprocess``, ``routed_experts_compute`` and ``combine``:

Raw (un-gated) expert outputs, gathered per token (method §2.9, 4). megatron applies the gate inside
the expert (act(fc1 x) * p before fc2). With ortho on, the dispatcher carries, in place of the
gates, each (token, expert) pair's top-k slot code k + 1 (exact in any float dtype; every
dispatcher moves the probs alongside the rows untouched); the experts run with p = 1 and the
expert side sends each slot's raw rows through its own combine (combine is linear, so TP
reduce-scatters and EP all-to-alls are reused unchanged): K combines instead of megatron's one,
and no extra hidden columns. The token side gets x[t, k, :] and forms the layer output
sum_k p[t, k] x[t, k] itself (fc2 has no bias, so it is megatron's function, rounded
differently); the router's gradient flows through those gates. Rows with code 0 (capacity
padding) belong to no slot. With ortho_coef = 0, and in any forward that cannot train (eval mode
or autograd off: rollouts, evaluation, anchor capture; no losses either), the expert path is
megatron's own, bit for bit.
Needs the gate after the expert: ``moe_apply_probs_on_input`` and ``moe_latent_size`` refuse.

Loss normalisation (CONTRIBUTING.md §9): with ``calculate_per_token_loss`` megatron divides every gradient by
the global LM token count N after the DP reduction; `set_loss_normalizers` gives each layer
N / (K T_glob) and N / T_glob (T_glob: routed tokens over micro-batches and ranks), so the
gradient is that of coef * global_sum / global_count. Without it, local counts are used.

Shape legend: S sequence, B micro-batch, T = S*B tokens, K top-k, E experts, X local experts,
D hidden, N rows after dispatch.
"""

from __future__ import annotations

import sys
from collections import deque
from contextlib import contextmanager

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_vp2o.algo import specialization
from megatron_vp2o.algo.config import SpecializationConfig
from megatron_vp2o.moe.experts import ExpertAccessor
from megatron_vp2o.platform import native


_MAX_PENDING = 64  # loss values kept (per loss) before an automatic fold-in (a loop that never flushes)


def recomputing() -> bool:
    """Whether this forward is megatron's activation-recompute forward: recompute forwards run
    inside the backward (``CheckpointFunction.backward`` / the recompute hooks), i.e. while the
    autograd engine executes a graph task; a first forward never does."""
    return torch._C._current_graph_task_id() != -1


_CHECKPOINT_CODE = None


def in_checkpoint_forward() -> bool:
    """Whether this call runs inside the first (no-grad) forward of megatron's activation
    checkpoint (``tensor_parallel.CheckpointFunction.forward``) of a training forward (some input
    needs a gradient): autograd is off there, but the forward trains -- its recompute in the
    backward attaches the losses. A forward-only pass (anchor capture) through the same checkpoint
    has no input needing a gradient."""
    global _CHECKPOINT_CODE
    if _CHECKPOINT_CODE is None:
        from megatron.core.tensor_parallel.random import CheckpointFunction

        _CHECKPOINT_CODE = CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CHECKPOINT_CODE:
            ctx = frame.f_locals.get("ctx")
            return bool(ctx is not None and any(getattr(ctx, "needs_input_grad", ())))
        frame = frame.f_back
    return False


class ResponseMaskedMoELayer(MoELayer):
    """megatron's MoELayer whose router aux losses (load balancing, z-loss) see the response tokens
    only in training forwards of RL batches -- the same tokens every VP2O statistic counts (method
    §2.5) -- so GRPO's layer (this class) and VP2O's (`VP2OMoELayer`, built on it) balance the same
    tokens. ``token_mask`` is set per micro-batch by `response_tokens` and handed to the router as
    its padding mask; without one (SFT, evaluation, rollouts) the layer is megatron's, bit for bit.
    Under activation recompute the recompute forward replays the first forward's mask (FIFO:
    megatron's schedules run the backwards of a chunk's micro-batches in forward order)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        # kwargs: what newer megatron-core releases add (0.19: is_mtp_layer, name; compat row 2)
        super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        self.token_mask = None  # [S*B] (or [B, S]) 0/1 tokens that count (the response), set per forward; None: all
        # activation recompute (megatron: full, or selective with "moe"): the whole layer runs again in
        # the backward, after `response_tokens` has left: the recompute replays the first forward's mask.
        self.recomputed = config.recompute_granularity == "full" or (
            config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or ()))
        self._replay: deque = deque()

    @property
    def trains(self) -> bool:
        """This forward can train: training mode with autograd on, as megatron's own router aux
        losses, or the first (no-grad) forward of megatron's activation checkpoint (its recompute in
        the backward attaches the losses)."""
        if not self.training:
            return False
        return torch.is_grad_enabled() or (self.recomputed and in_checkpoint_forward())

    def token_weights(self, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
        """0/1 weight per routed token [T] (T = S*B sequence-major, this TP rank's slice under
        sequence parallelism) from ``token_mask``; ones when none is set."""
        mask = self.token_mask
        if mask is None:
            return torch.ones(num_tokens, dtype=like.dtype, device=like.device)
        flat_T = mask.reshape(-1).to(device=like.device, dtype=like.dtype)
        if flat_T.numel() != num_tokens and self.config.sequence_parallel:
            rank = ps.get_tensor_model_parallel_rank()
            flat_T = flat_T[rank * num_tokens:(rank + 1) * num_tokens]
        assert flat_T.numel() == num_tokens, f"token mask of {flat_T.numel()} tokens for {num_tokens} routed tokens"
        return flat_T

    def aux_padding_mask(self, hidden_states, padding_mask=None):
        """The router's padding mask (True: not counted) from ``token_mask`` in training forwards;
        a mask the caller passed wins."""
        if padding_mask is None and self.token_mask is not None and self.training:
            num_tokens = hidden_states.numel() // hidden_states.shape[-1]
            padding_mask = self.token_weights(num_tokens, hidden_states).view(hidden_states.shape[:-1]) == 0
        return padding_mask

    def route(self, hidden_states, padding_mask=None):
        """Route with the response mask (the recompute forward replays the first forward's);
        ``record`` tells `_route_tokens` whether this is the first forward (statistics are taken once)."""
        recompute = self.training and self.recomputed and recomputing()
        if recompute:  # the recompute forward: the first forward's token mask, no statistics again
            saved, self.token_mask = self.token_mask, (self._replay.popleft() if self._replay else self.token_mask)
            try:
                return self._route_tokens(hidden_states, padding_mask, record=False)
            finally:
                self.token_mask = saved
        if self.training and self.recomputed and self.trains:  # will be recomputed in the backward
            self._replay.append(self.token_mask)
        return self._route_tokens(hidden_states, padding_mask, record=True)

    def _route_tokens(self, hidden_states, padding_mask, record: bool):
        return super().route(hidden_states, self.aux_padding_mask(hidden_states, padding_mask))


class VP2OTopKRouter(TopKRouter):
    """megatron's TopKRouter that can keep the gating logits of a call (the full softmax p of method §2.9 needs them; megatron's forward returns only the top-k probs and map). Chosen in the layer
    spec as the MoE submodules' router (`VP2OMoELayer.router_cls`); everything else is megatron's."""

    keep_logits = False
    kept_logits = None

    def gating(self, input):
        logits = super().gating(input)
        if self.keep_logits:
            self.kept_logits = logits
        return logits


class VP2OMoELayer(ResponseMaskedMoELayer):
    """MoELayer with prototypes, co-activation counts, routing captures and specialisation losses
    (the response mask of its router's aux losses: `ResponseMaskedMoELayer`)."""

    #: Loss weights; `vp2o_moe_layer` makes a subclass with other values; settable per instance.
    spec_cfg: SpecializationConfig = SpecializationConfig()

    #: The router class the layer spec builds for this layer (`compat.swap_moe_layer`).
    router_cls = None  # set below the class: VP2OTopKRouter

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        if not isinstance(self.router, VP2OTopKRouter):
            raise TypeError(f"VP2OMoELayer needs its router built as VP2OTopKRouter (got {type(self.router).__name__}): "
                            "build the layer through megatron_vp2o.model.spec (compat.swap_moe_layer)")
        num_experts, hidden = config.num_moe_experts, config.hidden_size
        self.top_k = config.moe_router_topk
        self.spec_cfg = type(self).spec_cfg
        dev = self.router.weight.device  # megatron's own placement (cuda.current_device(), or CPU)
        self.register_buffer("protos_XD", torch.zeros(self.num_local_experts, hidden, device=dev), persistent=True)
        self.register_buffer("protos_ED", torch.zeros(num_experts, hidden, device=dev), persistent=False)
        self.register_buffer("counts_EE", torch.zeros(num_experts, num_experts, device=dev), persistent=False)
        self.accessor = ExpertAccessor(self.experts, hidden)
        self.capture = False  # keep per-micro-batch top-k/gates (the VP2O step turns it on)
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.loss_norm: tuple[float, float] | None = None  # (N/(K T_glob), N/T_glob)
        self.loss_log = torch.zeros(4, device=dev)  # detached [ortho, var, entropy sum, tokens] of this step
        self._pending: list = []  # (slot, loss value) per loss and micro-batch, not yet folded into loss_log
        self._route = None
        self.grad_probe = self.pg_probe = False  # loss-gradient diagnostic pending (`start_grad_probe`)
        self.probe_sq = None  # [3] squared grad norms (ortho, var, pg) of the probed micro-batch; NaN: not measured
        self._probe_terms: list = []  # (slot, coef * loss) of the probed micro-batch, until `_run_grad_probe`
        # under activation recompute the statistics are taken in the first forward only; the recompute
        # (replaying the first forward's token mask: the base class) attaches the losses, the first logs them

    # --- per-step bookkeeping ------------------------------------------------------------------
    def reset_step_stats(self) -> None:
        self.counts_EE.zero_()
        self.captured = []
        self.loss_log = torch.zeros(4, device=self.counts_EE.device)
        self._pending = []
        self._replay.clear()

    def _fold_routing(self, mask_TE, logits_TE, weight_T) -> None:
        """Fold one micro-batch's routing into ``counts_EE`` (pair counts M^T M of the hard top-k
        masks of the counted tokens, = `algo.coactivation.coactivation_counts`) and ``loss_log``
        (router entropy sum, token count) at once: nothing of the micro-batch is kept until the
        backward (docs/cluster.md: the layers' statistics cost no memory across micro-batches)."""
        with torch.no_grad():
            weight_T = weight_T.float()
            mask_TE = mask_TE.float() * weight_T.unsqueeze(-1)  # zero off the counted tokens
            self.counts_EE.addmm_(mask_TE.t(), mask_TE)
            logp_TE = torch.log_softmax(logits_TE.float(), dim=-1)
            entropy = -((logp_TE.exp() * logp_TE).sum(-1) * weight_T).sum()
            self.loss_log = self.loss_log.to(entropy.device)
            self.loss_log[2:] += torch.stack([entropy, weight_T.sum()])

    def flush_stats(self) -> None:
        """Fold this layer's pending micro-batch statistics into ``counts_EE`` / ``loss_log``."""
        flush_step_stats([self])

    @property
    def expert_offset(self) -> int:
        return self.local_expert_indices[0]

    @property
    def losses_on(self) -> bool:
        """Specialisation losses (and the ortho capture) only where they can train (`trains`; same
        function as without recompute). Rollouts, evaluation and anchor capture run megatron's expert
        path unchanged."""
        return self.trains

    @property
    def ortho_on(self) -> bool:
        return self.spec_cfg.ortho_coef > 0 and self.losses_on

    # --- stages --------------------------------------------------------------------------------
    def _route_tokens(self, hidden_states, padding_mask, record: bool):
        """The router's own forward (so its hooks and routing replay run; its aux losses see the
        response tokens only: `aux_padding_mask`), keeping the gating logits (for the full softmax),
        top-k ids and gates of this batch."""
        router = self.router
        padding_mask = self.aux_padding_mask(hidden_states, padding_mask)
        router.keep_logits = True
        try:
            probs_TE, routing_map_TE = router(hidden_states, padding_mask=padding_mask)
        finally:
            router.keep_logits = False
        logits, router.kept_logits = router.kept_logits, None
        with native():  # our own tensor work: no device rewriting needed (platform.native)
            mask_TE = routing_map_TE.to(probs_TE.dtype)
            topk_TK = torch.sort(torch.topk(mask_TE, self.top_k, dim=-1).indices, -1).values
            gates_TK = torch.gather(probs_TE, 1, topk_TK)
            weight_T = self.token_weights(topk_TK.shape[0], probs_TE) if self.training else None
            if self.training and record:  # counts, router entropy (response tokens only), folded in now
                self._fold_routing(mask_TE.detach(), logits.detach().view(topk_TK.shape[0], -1), weight_T)
                if self.capture:
                    self.captured.append((topk_TK.detach(), gates_TK.detach(), weight_T > 0))
        self._route = {"logits": logits.view(-1, self.config.num_moe_experts), "topk": topk_TK, "gates": gates_TK,
                       "weight": weight_T}
        return probs_TE, routing_map_TE

    def preprocess(self, hidden_states, probs, routing_map):
        if not self.ortho_on:
            return super().preprocess(hidden_states, probs, routing_map)
        cfg = self.config  # dispatch slot codes k+1 in place of the gates (module docstring)
        if cfg.moe_apply_probs_on_input or getattr(cfg, "moe_latent_size", None) or cfg.moe_shared_expert_overlap:
            raise ValueError("vp2o.specialization.ortho_coef > 0 needs the gate applied after the expert and a plain "
                             "combine: set moe_apply_probs_on_input=false, moe_shared_expert_overlap=false and no "
                             "moe_latent_size, or vp2o.specialization.ortho_coef=0")
        topk_TK = self._route["topk"]
        slots_TK = torch.arange(1, self.top_k + 1, device=probs.device, dtype=probs.dtype).expand_as(topk_TK)
        codes_TE = torch.zeros_like(probs).scatter(1, topk_TK, slots_TK)
        hidden_states, codes = super().preprocess(hidden_states, codes_TE, routing_map)
        # alltoall: rows come back from token_combine in this (source-side permuted) order
        self._route["one_combine"] = isinstance(self.token_dispatcher, MoEAlltoAllTokenDispatcher)
        self._route["codes_R1"] = codes.detach().round().unsqueeze(-1)
        return hidden_states, codes

    def routed_experts_compute(self, hidden_states, probs):
        if not self.ortho_on:
            return super().routed_experts_compute(hidden_states, probs)
        disp = self.token_dispatcher
        x_ND, tokens_per_expert, codes_N = disp.dispatch_postprocess(hidden_states, probs)
        raw_ND, bias = self.experts(x_ND, tokens_per_expert, torch.ones_like(codes_N))
        assert bias is None, "VP2O ortho capture needs bias-free experts"
        if self._route["one_combine"]:
            return disp.combine_preprocess(raw_ND), None
        code_N1 = codes_N.detach().round().unsqueeze(-1)  # 0: padding rows (no slot)
        slots = [disp.combine_preprocess(raw_ND * (code_N1 == k + 1).to(raw_ND.dtype)) for k in range(self.top_k)]
        self._route["slots"] = slots[1:]
        return slots[0], None

    def combine(self, output):
        if self.ortho_on and not self._route["one_combine"]:
            self._route["slots"] = [self.token_dispatcher.token_combine(s) for s in self._route["slots"]]
        return super().combine(output)

    def postprocess(self, output, shared_expert_output):
        ortho = None
        if self.ortho_on:  # output = sum_k gate_k x_k, token side (fc2 has no bias: megatron's function)
            disp = self.token_dispatcher
            raw_TKD = self._rows_to_slots(output) if self._route["one_combine"] else None
            if raw_TKD is None:  # un-permute each slot's rows with the dispatcher's own combine_postprocess
                if self._route["one_combine"]:
                    codes_R1 = self._route["codes_R1"]
                    rows = [output * (codes_R1 == k + 1).to(output.dtype) for k in range(self.top_k)]
                else:
                    rows = [output, *self._route["slots"]]
                raw_TKD = torch.stack([disp.combine_postprocess(r).reshape(-1, r.shape[-1]) for r in rows], dim=1)
            # output and the ortho loss's numerator in one fused pass each way (algo.specialization)
            weight_T = self._route["weight"]  # response tokens only (method §2.9)
            output_TD, ortho_total = specialization.gated_sum_and_orthogonality(
                raw_TKD, self._route["gates"], weight_T, form=self.spec_cfg.ortho_form)
            ortho = (ortho_total, weight_T.sum() * raw_TKD.shape[1])  # count K * T
            output = output_TD.view(*disp.hidden_shape[:-1], raw_TKD.shape[-1])
            if shared_expert_output is not None:
                output = output + shared_expert_output
        else:
            output = super().postprocess(output, shared_expert_output)
        with native():
            aux = self._specialisation_loss(ortho)
        self._run_grad_probe()  # outside native(): megatron's backward may need the CPU layer
        self._route = None
        if aux is not None and self.training and torch.is_grad_enabled():
            output = moe_utils.MoEAuxLossAutoScaler.apply(output, aux)
        return output

    def _rows_to_slots(self, rows_RD):
        """alltoall rows back at the token side -> x[t, k, :] with one ``index_copy`` (row r is token
        ``reversed_local_input_permutation_mapping[r]``, slot ``code[r] - 1``), when megatron's
        un-fused, drop-less permutation made every (token, slot) pair exactly one row; else None."""
        disp, cfg = self.token_dispatcher, self.config
        row_tokens_R = getattr(disp, "reversed_local_input_permutation_mapping", None)
        num_tokens = disp.hidden_shape_before_permute[0]
        if (cfg.moe_permute_fusion or getattr(disp, "drop_and_pad", False) or cfg.moe_expert_capacity_factor
                or getattr(cfg, "moe_router_padding_for_quantization", False) or row_tokens_R is None
                or row_tokens_R.dim() != 1 or not row_tokens_R.shape[0] == rows_RD.shape[0] == num_tokens * self.top_k):
            return None
        slot_R = self._route["codes_R1"].squeeze(-1).long() - 1
        idx_R = row_tokens_R.long() * self.top_k + slot_R
        raw_flat = rows_RD.new_zeros(num_tokens * self.top_k, rows_RD.shape[-1]).index_copy(0, idx_R, rows_RD)
        return raw_flat.view(num_tokens, self.top_k, -1)

    # --- losses (method §2.9) ---------------------------------------------------------------------
    def _specialisation_loss(self, ortho):
        """``ortho``: (sum, count) of the orthogonality loss from `postprocess`, or None."""
        cfg, terms = self.spec_cfg, []
        probing = self.grad_probe and self.training and torch.is_grad_enabled() and not recomputing()
        if ortho is not None:
            total, count = ortho
            terms.append((0, "vp2o_ortho", cfg.ortho_coef, total, count))
        if cfg.var_coef > 0 and self.losses_on:
            total, count = specialization.routing_variance_loss_sum_from_logits(self._route["logits"],
                                                                                self._route["weight"])
            terms.append((1, "vp2o_var", cfg.var_coef, total, count))
        aux = None
        for slot, name, coef, total, count in terms:
            scale = (1.0 / count) if self.loss_norm is None else self.loss_norm[slot]
            loss = total * scale
            if not (self.recomputed and recomputing()):  # logged once: by the first forward
                if self.training:
                    self._pending.append((slot, loss.detach()))
                    if len(self._pending) >= 2 * _MAX_PENDING:
                        self.flush_stats()
                moe_utils.save_to_aux_losses_tracker(name, loss.detach(), self.layer_number,
                                                     self.config.num_layers)
            aux = coef * loss if aux is None else aux + coef * loss
            if probing:
                self._probe_terms.append((slot, coef * loss))
        if probing:
            self.grad_probe = False  # one micro-batch per probed step
        return aux

    def probe_params(self) -> list:
        """The parameters the loss-gradient diagnostic measures: the router's and the routed experts'."""
        return [p for p in (*self.router.parameters(), *self.experts.parameters()) if p.requires_grad]

    def _run_grad_probe(self) -> None:
        """Squared norm of the gradient of each stashed term (this layer's own coef * loss of the probed
        micro-batch) w.r.t. `probe_params`, into ``probe_sq`` (`term_grad_sq`)."""
        terms, self._probe_terms = self._probe_terms, []
        for slot, loss in terms:
            self.probe_sq[slot] = term_grad_sq(loss, self.probe_params())

    # --- checkpointing -------------------------------------------------------------------------
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Prototypes as one [E, D] tensor per layer, sharded along E over the EP group."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}protos_XD"
        ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
        replica = (0, ps.get_expert_tensor_parallel_rank(), ps.get_expert_data_parallel_rank())
        state[key] = ShardedTensor.from_rank_offsets(
            key, self.protos_XD, *sharded_offsets, (len(sharded_offsets), ep_rank, ep_size),
            replica_id=replica, prepend_axis_num=len(sharded_offsets))
        return state


VP2OMoELayer.router_cls = VP2OTopKRouter


def flush_step_stats(layers) -> None:
    """Fold every layer's pending specialisation-loss values (one scalar per loss, layer and
    micro-batch) into its ``loss_log``; the routing statistics are folded in per micro-batch by
    the layer itself (`VP2OMoELayer._fold_routing`)."""
    for layer in layers:
        losses = layer._pending
        if losses:
            layer.loss_log = layer.loss_log.to(losses[0][1].device)
            for slot in (0, 1):
                vals = [v for k, v in losses if k == slot]
                if vals:
                    layer.loss_log[slot] += torch.stack(vals).sum()
        layer._pending = []


# --- loss-gradient diagnostic (issue 21 item 1; docs/method.md §2.13) ------------------------------------
def probe_supported(config) -> bool:
    """torch.autograd.grad leaves the step untouched only when no backward writes gradients itself:
    megatron's reentrant activation checkpoint (`CheckpointFunction` runs ``autograd.backward``) and the
    fused weight-gradient accumulation into ``main_grad`` do; the diagnostic is skipped under either."""
    recompute = getattr(config, "recompute_granularity", None)
    return not recompute and not getattr(config, "gradient_accumulation_fusion", False)


def start_grad_probe(layers) -> bool:
    """Arm the diagnostic for the next training micro-batch of every layer: each measures its own
    specialisation terms in its forward, the policy loss (`probe_policy_gradient`) its term; False
    (nothing armed) where `probe_supported` says no. ``probe_sq`` starts as NaN (not measured)."""
    if not layers or not probe_supported(layers[0].config):
        return False
    for layer in layers:
        layer.grad_probe = layer.pg_probe = True
        layer.probe_sq = torch.full((3,), float("nan"), device=layer.counts_EE.device)
        layer._probe_terms = []
    return True


def stop_grad_probe(layers) -> None:
    for layer in layers:
        layer.grad_probe = layer.pg_probe = False
        layer._probe_terms = []


@contextmanager
def aux_grads_off(device):
    """megatron's ``MoEAuxLossAutoScaler`` hands every attached aux loss (router balancing, z-loss, our
    specialisation losses) the gradient ``main_loss_backward_scale`` whenever a backward passes the
    output it rides on; a probe wants one term alone, so the scale is 0 within the block, set and
    put back through megatron's own ``set_loss_scale`` (unset counts as megatron's default, 1)."""
    scaler = moe_utils.MoEAuxLossAutoScaler
    saved = scaler.main_loss_backward_scale
    value = saved.detach().clone() if saved is not None else torch.ones((), device=device)
    scaler.set_loss_scale(torch.zeros((), device=value.device, dtype=value.dtype))
    try:
        yield
    finally:
        scaler.set_loss_scale(value)


def term_grad_sq(loss: torch.Tensor, params: list) -> torch.Tensor:
    """||d loss / d params||^2 (fp32, on the device) by ``torch.autograd.grad`` with the graph kept:
    nothing is accumulated into ``.grad`` or megatron's ``main_grad`` buffers (no AccumulateGrad node,
    hence no DDP hook, runs), so the step's own backward is unchanged."""
    if not loss.requires_grad:
        return torch.zeros((), device=loss.device)
    with aux_grads_off(loss.device):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    sq = [g.float().square().sum() for g in grads if g is not None]
    return torch.stack(sq).sum() if sq else torch.zeros((), device=loss.device)


def pg_probe_layers(model) -> list:
    """The VP2O layers of ``model`` waiting for the policy-gradient term of the diagnostic."""
    module = model.module if hasattr(model, "module") else model
    layers = module.__dict__.get("_vp2o_layers")
    if layers is None:
        layers = module.__dict__["_vp2o_layers"] = vp2o_layers(module)
    return [layer for layer in layers if layer.pg_probe]


def probe_policy_gradient(layers, loss: torch.Tensor) -> None:
    """The policy loss's part of the diagnostic: one ``autograd.grad`` of ``loss`` (this micro-batch's
    policy-loss sum, aux losses held at zero) w.r.t. every waiting layer's `probe_params`; the squared
    norm per layer into ``probe_sq[2]``. Layers on earlier pipeline stages are out of the graph's
    reach here and keep NaN."""
    params = [layer.probe_params() for layer in layers]
    flat = [p for ps_ in params for p in ps_]
    if loss.requires_grad and flat:
        with aux_grads_off(loss.device):
            grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
        i = 0
        for layer, ps_ in zip(layers, params):
            sq = [g.float().square().sum() for g in grads[i:i + len(ps_)] if g is not None]
            i += len(ps_)
            layer.probe_sq[2] = torch.stack(sq).sum() if sq else torch.zeros((), device=loss.device)
    for layer in layers:
        layer.pg_probe = False


@contextmanager
def response_tokens(model, loss_mask_BS: torch.Tensor):
    """Within the block, every response-masked MoE layer of ``model`` (GRPO's and VP2O's) counts only
    the tokens where ``loss_mask_BS`` [B, S] is set (the columns whose outputs score response tokens;
    method §2.5, 2.9, 2.10): in megatron's router aux losses and, in VP2O layers, the co-activation
    counts, the active set, the specialisation losses, the captured barycenters and the router
    entropy. Set per micro-batch by the RL forward step."""
    layers = model.__dict__.get("_masked_moe_layers")  # found once: the model's modules do not change after build
    if layers is None:
        module = model.module if hasattr(model, "module") else model
        layers = [m for m in module.modules() if isinstance(m, ResponseMaskedMoELayer)]
        model.__dict__["_masked_moe_layers"] = layers
    mask_T = loss_mask_BS.detach().t().reshape(-1)  # sequence-major, as the layers route [S, B] tokens
    for layer in layers:
        layer.token_mask = mask_T
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = None


def vp2o_moe_layer(spec_cfg: SpecializationConfig) -> type:
    """A `VP2OMoELayer` subclass carrying ``spec_cfg`` (what a layer spec's ``module`` needs)."""
    return type("VP2OMoELayer", (VP2OMoELayer,), {"spec_cfg": spec_cfg})


def vp2o_layers(model) -> list[VP2OMoELayer]:
    """The VP2O MoE layers of a (DDP-wrapped) model chunk, in layer order."""
    module = model.module if hasattr(model, "module") else model
    return [m for m in module.modules() if isinstance(m, VP2OMoELayer)]

"""Functions that run inside multi-rank worlds for tests/distributed/test_vp2o_parity.py.

Same protocol as worlds_foundation: a 1-rank world writes the initial weights + prototypes (dist
checkpoint) and takes the reference VP2O step; each layout world loads them resharded, takes the
same step (Stein, repulsion, specialisation losses, trust region on), checks the hook against
`algo.stein.stein_transport` on the gathered full gradients, takes a second step with a forced
trust-region violation (exact restore check) and saves step 1's weights; a 1-rank world compares.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distributed.worlds_foundation import global_batch, my_micro_batches, tiny_config

VP2O = dict(stein=dict(repulsion_coef=0.01), specialization=dict(ortho_coef=1e-2, var_coef=1e-2),
            trust_region=dict(anchor_delta=0.4))
PLAIN = dict(stein=dict(repulsion_coef=0.0, coact_topm=0, freeze_inactive=False),
             specialization=dict(ortho_coef=0.0, var_coef=0.0), trust_region=dict(enabled=False))


def vp2o_config(parallel=None, vp2o=None):
    from megatron_vp2o.config import Config, build, to_dict

    data = to_dict(tiny_config(parallel))
    data["vp2o"] = vp2o or VP2O
    return build(Config, data)


def _build(cfg, init: bool, path: str | None = None):
    from megatron_vp2o.checkpoint import load_model
    from megatron_vp2o.moe import vp2o_moe_layer
    from megatron_vp2o.training.setup import build_trainable
    from megatron_vp2o.rl.learner.vp2o import init_vp2o

    tr = build_trainable(cfg, moe_layer_cls=vp2o_moe_layer(cfg.vp2o.specialization))
    if path is not None:
        load_model(path, tr.models)
        tr.optimizer.reload_model_params()
    state = init_vp2o(tr, cfg.vp2o, cfg.parallel.use_sequence_parallel, init_prototypes=init)
    return tr, state


def _params(tr) -> dict:
    return {k: v.detach().clone() for k, v in tr.module.state_dict().items() if torch.is_tensor(v)}


def _opt_state(tr) -> list:
    from megatron_vp2o.distributed.trust_region import _states, main_param_entries

    states = _states(tr.optimizer)
    out = [e[1].detach().clone() for e in main_param_entries(tr.optimizer)]
    for e in main_param_entries(tr.optimizer):
        out += [v.clone() for v in states.get(e[1], {}).values() if torch.is_tensor(v)]
    return out


def _world_min(flag: bool) -> bool:
    t = torch.tensor([0.0 if flag else 1.0])
    dist.all_reduce(t)
    return bool(t.item() == 0)


def _gather_rows(local_XP, groups):
    """[X, P_local] -> [E, etp * P_local]: ETP shards side by side, EP experts stacked."""
    from megatron_vp2o.distributed.reductions import group_size, gather_experts

    etp = group_size(groups.expert_tp)
    if etp > 1:
        parts = [torch.empty_like(local_XP) for _ in range(etp)]
        dist.all_gather(parts, local_XP.contiguous(), group=groups.expert_tp)
        local_XP = torch.cat(parts, dim=1)
    return gather_experts(local_XP, groups.expert_ep)


class HookProbe:
    """Reference stein_transport on gathered full gradients vs the hook's output (max |diff|)."""

    def __init__(self, cfg):
        self.cfg, self.ref, self.diff = cfg.vp2o.stein, {}, 0.0

    def __call__(self, stage, state):
        from megatron_vp2o.algo import coactivation, kernels, stein
        from megatron_vp2o.distributed.reductions import gather_expert_grads, reduce_counts_

        for layer in state.layers:
            if stage == "pre_stein":
                gather_expert_grads(state.model)
                grads_EP = _gather_rows(layer.accessor.grads_XP().float(), state.groups)
                counts = reduce_counts_(layer.counts_EE.clone(), state.groups)
                m = self.cfg.resolved_topm(layer.top_k)
                coact, inactive = coactivation.neighbour_masks(
                    coactivation.coactivation_matrix(counts, self.tokens), m)
                kernel = kernels.prototype_kernel(layer.protos_ED, **self.cfg.kernel_args())
                rep_EP = self._repulsion(layer, state, inactive, grads_EP.shape[1])
                self.ref[layer.layer_number] = stein.stein_transport(
                    grads_EP, kernel, coact, coactivation.active_experts(counts), topm=m,
                    repulsion_EP=rep_EP, repulsion_coef=self.cfg.repulsion_coef)
            else:
                got = _gather_rows(layer.accessor.grads_XP().float(), state.groups)
                self.diff = max(self.diff, (got - self.ref[layer.layer_number]).abs().max().item())

    def _repulsion(self, layer, state, inactive, num_cols):
        from megatron_vp2o.algo import stein
        from megatron_vp2o.distributed.reductions import group_size, gather_experts

        etp = group_size(state.groups.expert_tp)
        w_XDF = layer.accessor.fc2_weight_XDF().float()
        shards = [w_XDF] if etp == 1 else [torch.empty_like(w_XDF) for _ in range(etp)]
        if etp > 1:
            dist.all_gather(shards, w_XDF.contiguous(), group=state.groups.expert_tp)
        w_full = gather_experts(torch.cat(shards, -1).flatten(1), state.groups.expert_ep)
        w_full = w_full.view(-1, w_XDF.shape[1], etp * w_XDF.shape[2])
        rep_EDF = stein.repulsion_grad(w_full, layer.protos_ED, inactive, self.cfg.kernel_tau0, self.cfg.kernel, 0,
                                       self.cfg.kernel_bandwidth, self.cfg.kernel_sharpness)
        per = num_cols // etp
        off2 = layer.accessor.fc2_offset()
        rep_EP = rep_EDF.new_zeros(rep_EDF.shape[0], num_cols)
        for r, chunk in enumerate(rep_EDF.chunk(etp, dim=-1)):
            rep_EP[:, r * per + off2:(r + 1) * per] = chunk.reshape(chunk.shape[0], -1)
        return rep_EP


def reference(payload) -> dict:
    """1 rank: initial checkpoint (30-step prototypes), plain-vs-VP2O(zero coefs) bitwise check."""
    from megatron_vp2o.checkpoint import save_checkpoint
    from megatron_vp2o.training.setup import build_trainable
    from megatron_vp2o.training.step import train_step
    from megatron_vp2o.rl.learner.vp2o import vp2o_train_step

    cfg = vp2o_config()
    tr, _ = _build(cfg, init=True)
    save_checkpoint(payload["init"], 0, tr, {"kind": "test"}, with_optimizer=False)
    plain = build_trainable(cfg)
    from megatron_vp2o.checkpoint import load_model

    load_model(payload["init"], plain.models)
    plain.optimizer.reload_model_params()
    train_step(plain, my_micro_batches(global_batch()))
    zero_cfg = vp2o_config(vp2o=PLAIN)
    tr0, state0 = _build(zero_cfg, init=False, path=payload["init"])
    vp2o_train_step(tr0, my_micro_batches(global_batch()), state0)
    p_plain, p_zero = _params(plain), _params(tr0)
    bitwise = all(torch.equal(p_plain[k], p_zero[k]) for k in p_plain)
    return {"bitwise_plain": bitwise}


def layout_step(payload):
    """N ranks: load, VP2O step with the hook probe, save; forced violation restores exactly."""
    from megatron_vp2o.checkpoint import save_checkpoint
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.rl.learner.vp2o import capture_anchors, vp2o_train_step

    cfg = vp2o_config(payload["parallel"])
    init_parallel(cfg)
    extra = reference(payload) if payload.get("reference") else {}
    tr, state = _build(cfg, init=False, path=payload["init"])
    state.model = tr.model
    mbs = my_micro_batches(global_batch())
    anchors = capture_anchors(tr, mbs, state)
    probe = HookProbe(cfg)
    probe.tokens = float(global_batch().shape[0] * (global_batch().shape[1] - 1))
    m1 = vp2o_train_step(tr, mbs, state, anchors=anchors, probe=probe)
    save_checkpoint(payload["out"], 1, tr, {"kind": "test"}, with_optimizer=False)
    before_p, before_o = _params(tr), _opt_state(tr)
    state.cfg.trust_region.anchor_delta = 1e-9
    state.cfg.trust_region.on_violation = "reject"
    m2 = vp2o_train_step(tr, mbs, state, anchors=capture_anchors(tr, mbs, state))
    after_p, after_o = _params(tr), _opt_state(tr)
    exact = all(torch.equal(before_p[k], after_p[k]) for k in before_p) and len(before_o) == len(after_o) \
        and all(torch.equal(a, b) for a, b in zip(before_o, after_o))
    diffs = torch.tensor([probe.diff])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    return {"world": dist.get_world_size(), "loss": m1["loss"], "decision": m1["decision"],
            "d_anc": m1["d_anc"], "d_anc_trace": m1["d_anc_trace"], "backtracks": m1["backtracks"], "hook_diff": diffs.item(),
            "reject_decision": m2["decision"], "restore_exact": _world_min(exact),
            "metrics": {k: v for k, v in m1.items() if k.startswith(("exchange", "stein", "timing"))},
            **extra}


def compare(payload):
    """1 rank: max |param diff| (prototypes included) of every layout against the reference."""
    from megatron_vp2o.distributed.init import init_parallel

    cfg = vp2o_config()
    init_parallel(cfg)
    ref, _ = _build(cfg, init=False, path=payload["ref"])
    ref_params = _params(ref)
    out = {}
    for name, path in payload["layouts"].items():
        other, _ = _build(cfg, init=False, path=path)
        diffs = {k: (ref_params[k] - v).abs().max().item() for k, v in _params(other).items()
                 if v.is_floating_point()}
        worst = max(diffs, key=diffs.get)
        out[name] = {"max_param_diff": diffs[worst], "worst": worst,
                     "proto_diff": max(v for k, v in diffs.items() if "protos" in k)}
    out["_refusal"] = _refusal_checks(cfg, ref)
    return out


def _refusal_checks(cfg, vp2o_trainable) -> dict:
    """VP2O on a model built with megatron's plain MoELayer is refused (both spec forms, compat
    row 1); the VP2O build has one VP2O layer (with the VP2O router) per MoE layer."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_vp2o.moe.layer import VP2OTopKRouter, vp2o_layers
    from megatron_vp2o.training.setup import build_trainable
    from megatron_vp2o.rl.learner.vp2o import NoVP2OLayers, init_vp2o

    plain = build_trainable(cfg, moe_layer_cls=MoELayer)
    try:
        init_vp2o(plain, cfg.vp2o, cfg.parallel.use_sequence_parallel)
        message = None
    except NoVP2OLayers as exc:
        message = str(exc)
    moe = [m for m in vp2o_trainable.module.modules() if isinstance(m, MoELayer)]
    layers = vp2o_layers(vp2o_trainable.model)
    return {"message": message, "num_moe": len(moe), "num_vp2o": len(layers),
            "vp2o_routers": sum(isinstance(layer.router, VP2OTopKRouter) for layer in layers)}

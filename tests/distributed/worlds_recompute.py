"""Functions that run inside test worlds for tests/distributed/test_recompute_parity.py.

One world per layout: the same initial weights (written by the 1-rank world), the same VP2O learner
step (Stein, repulsion, ortho + var losses, trust region with anchors) with ``model.recompute`` none,
full and selective; the VP2O layers count only a response mask (the first columns of every row are
prompt) so the recompute must replay the first forward's mask. Returned per mode: loss, decision,
parameters, prototypes, co-activation counts, loss logs, captures, and the bytes one training
forward saves for backward.
"""

from __future__ import annotations

from functools import partial

import torch

from distributed.worlds_foundation import global_batch, my_micro_batches
from distributed.worlds_vp2o import _build, vp2o_config

MODES = ("none", "full", "selective")
PROMPT = 5  # columns of every row outside the response mask


def masked_forward_step(data_iterator, model):
    """lm_forward_step with the VP2O layers counting only the response columns (as the RL step)."""
    from megatron_vp2o.moe.layer import response_tokens
    from megatron_vp2o.training.step import lm_forward_step

    batch = next(data_iterator)
    module = model
    while hasattr(module, "module"):
        module = module.module
    with response_tokens(module, batch.loss_mask):
        return lm_forward_step(iter([batch]), model)


def _micro_batches():
    mbs = my_micro_batches(global_batch())
    for mb in mbs:
        mb.loss_mask[:, :PROMPT] = 0
    return mbs


def saved_bytes(tr, mb) -> int:
    """Bytes of distinct storages one training forward of ``mb`` saves for backward (this stage's
    model; first stage only with pp > 1, where the forward takes token ids)."""
    from megatron_vp2o.training.step import causal_mask, position_ids

    seen: dict = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model = tr.model
    tokens = mb.tokens
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, position_ids(*tokens.shape), causal_mask(tokens.shape[1]), labels=mb.labels)
    del out
    params = {p.untyped_storage().data_ptr() for p in tr.model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def _state(tr, state, metrics) -> dict:
    layers = state.layers
    return {"loss": metrics["loss"], "decision": metrics["decision"], "backtracks": metrics["backtracks"],
            "d_anc": metrics["d_anc"],
            "params": {k: v.detach().clone() for k, v in tr.module.state_dict().items() if torch.is_tensor(v)},
            "counts": [layer.counts_EE.clone() for layer in layers],
            "loss_log": [layer.loss_log.clone() for layer in layers],
            "captured": [torch.cat([c[0] for c in layer.captured]) for layer in layers],
            "gates": [torch.cat([c[1] for c in layer.captured]) for layer in layers],
            "active": [layer.active_E.clone() for layer in layers],
            "stats": {k: v for k, v in metrics.items() if k.startswith(("moe/", "loss/", "stein/"))}}


def init_weights(payload):
    """1 rank: the initial checkpoint (30-step prototypes)."""
    from megatron_vp2o.checkpoint import save_checkpoint
    from megatron_vp2o.distributed.init import init_parallel

    cfg = vp2o_config()
    init_parallel(cfg)
    tr, _ = _build(cfg, init=True)
    save_checkpoint(payload["init"], 0, tr, {"kind": "test"}, with_optimizer=False)
    return {}


def layout_modes(payload):
    """One layout: the VP2O step under each recompute mode, from the same weights."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.rl.learner.vp2o import capture_anchors, vp2o_train_step

    out = {}
    for i, mode in enumerate(MODES):
        cfg = vp2o_config(payload["parallel"])
        cfg.model.recompute = mode
        if i == 0:
            init_parallel(cfg)
        tr, state = _build(cfg, init=False, path=payload["init"])
        mbs = _micro_batches()
        step = partial(masked_forward_step)
        anchors = capture_anchors(tr, mbs, state, forward_step=step)
        metrics = vp2o_train_step(tr, mbs, state, forward_step=step, anchors=anchors)
        result = _state(tr, state, metrics)
        if ps.get_pipeline_model_parallel_world_size() == 1:
            result["saved_bytes"] = saved_bytes(tr, mbs[0])
        # every rank's own tensors agree across modes: compare here, report the worst over ranks
        out[mode] = result
    ref = out["none"]
    report = {"world": dist.get_world_size()}
    for mode in MODES[1:]:
        got = out[mode]
        flags = {
            "params": all(torch.equal(ref["params"][k], got["params"][k]) for k in ref["params"]),
            "counts": all(torch.equal(a, b) for a, b in zip(ref["counts"], got["counts"])),
            "loss_log": all(torch.equal(a, b) for a, b in zip(ref["loss_log"], got["loss_log"])),
            "captured": all(torch.equal(a, b) for a, b in zip(ref["captured"], got["captured"]))
            and all(torch.equal(a, b) for a, b in zip(ref["gates"], got["gates"])),
            "active": all(torch.equal(a, b) for a, b in zip(ref["active"], got["active"])),
        }
        bad = torch.tensor([0.0 if v else 1.0 for v in flags.values()])
        dist.all_reduce(bad)
        report[mode] = {
            **{k: bool(b == 0) for k, b in zip(flags, bad.tolist())},
            "max_param_diff": max((ref["params"][k].double() - got["params"][k].double()).abs().max().item()
                                  for k in ref["params"] if ref["params"][k].is_floating_point()),
            "loss": (ref["loss"], got["loss"]), "decision": (ref["decision"], got["decision"]),
            "d_anc": (ref["d_anc"], got["d_anc"]),
            "stats_equal": ref["stats"] == got["stats"],
            "saved_bytes": (ref.get("saved_bytes"), got.get("saved_bytes")),
        }
    report["num_layers_captured"] = len(ref["captured"])
    return report

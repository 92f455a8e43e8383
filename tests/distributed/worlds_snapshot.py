"""Rank code for tests/distributed/test_snapshot.py: the trust-region snapshot (main parameters and
optimizer state only, model parameters rebuilt) restores exactly, backtracks by the formula, and
holds no model-parameter copy; fp32 and bf16, with and without the distributed optimizer, on the
device and on the host."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from distributed.worlds_foundation import global_batch, my_micro_batches
from distributed.worlds_vp2o import vp2o_config

COMBOS = list(itertools.product(("fp32", "bf16"), (True, False), ("device", "host")))


def _model_params(tr) -> list:
    return [p.detach().clone() for p in tr.module.parameters()]


def _opt_tensors(tr) -> list:
    from megatron_vp2o.distributed.trust_region import _states, main_param_entries

    states = _states(tr.optimizer)
    entries = main_param_entries(tr.optimizer)
    out = [e[1].detach().clone() for e in entries]
    for e in entries:
        out += [v.clone() for v in states.get(e[1], {}).values() if torch.is_tensor(v)]
    return out


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _grads_step(tr, state):
    """Forward/backward of the VP2O learner (statistics, Stein) without the optimizer step."""
    from megatron_vp2o.rl.learner.vp2o import _forward_backward

    for layer in state.layers:
        layer.reset_step_stats()
    from megatron_vp2o.training.step import lm_forward_step

    _forward_backward(tr, my_micro_batches(global_batch()), lm_forward_step)


def one_combo(dtype: str, distopt: bool, where: str) -> dict:
    from megatron_vp2o.distributed.trust_region import ParamSnapshot, _states, main_param_entries
    from megatron_vp2o.moe import vp2o_moe_layer
    from megatron_vp2o.training.setup import build_trainable
    from megatron_vp2o.rl.learner.vp2o import capture_anchors, init_vp2o, vp2o_train_step

    cfg = vp2o_config({"distributed_optimizer": distopt})
    cfg.model.params_dtype = dtype
    tr = build_trainable(cfg, moe_layer_cls=vp2o_moe_layer(cfg.vp2o.specialization))
    state = init_vp2o(tr, cfg.vp2o, False)
    mbs = my_micro_batches(global_batch())
    vp2o_train_step(tr, mbs, state)  # Adam state exists from here on
    out = {}
    # 1. the learner's own reject (trust region forced to fail): every tensor bitwise back
    before_p, before_o = _model_params(tr), _opt_tensors(tr)
    state.cfg.trust_region.anchor_delta = 1e-9
    state.cfg.trust_region.on_violation = "reject"
    m = vp2o_train_step(tr, mbs, state, anchors=capture_anchors(tr, mbs, state))
    out["learner_reject"] = m["decision"] == "reject"
    out["learner_exact"] = _equal(before_p, _model_params(tr)) and _equal(before_o, _opt_tensors(tr))
    # 2. the snapshot itself (device or host): reject, backtrack s=1 and s=0, masked restore
    snap = ParamSnapshot(tr.model, tr.optimizer, where=where)
    _grads_step(tr, state)
    snap.take(wait=False)
    snap.ready()
    tr.optimizer.step()
    after_p, after_o = _model_params(tr), _opt_tensors(tr)
    out["step_changed"] = not _equal(before_p, after_p)
    after = snap.capture_after()
    snap.scale_update(after, 0.0)
    out["backtrack_s0_is_before"] = _equal(before_p, _model_params(tr))
    snap.scale_update(after, 1.0)
    out["backtrack_s1_is_after"] = _equal(after_p, _model_params(tr))
    snap.scale_update(after, 0.5)
    half = _model_params(tr)
    out["backtrack_half_between"] = not _equal(half, before_p) and not _equal(half, after_p)
    snap.scale_update(after, 1.0)
    snap.restore()
    out["restore_exact"] = _equal(before_p, _model_params(tr)) and _equal(before_o, _opt_tensors(tr))
    # memory: the main parameters and optimizer state, never the model parameters again
    storages = {p.untyped_storage().data_ptr() for p in tr.module.parameters()}
    entries = main_param_entries(tr.optimizer)
    mains = {id(e[1]): e[1] for e in entries}
    states = _states(tr.optimizer)
    expect = sum(t.numel() * t.element_size() for t in mains.values())
    expect += sum(v.numel() * v.element_size() for mm in mains.values() for v in states.get(mm, {}).values()
                  if torch.is_tensor(v))
    out["snapshot_bytes"] = snap.nbytes()
    out["expected_bytes"] = expect
    out["model_param_bytes"] = sum(p.numel() * p.element_size() for p in tr.module.parameters())
    out["old_snapshot_bytes"] = out["model_param_bytes"] + expect - sum(
        t.numel() * t.element_size() for t in mains.values() if t.untyped_storage().data_ptr() in storages)
    out["host_buffers"] = all(b.device.type == "cpu" for b in snap._buffers)
    return out


def combos(payload) -> dict:
    from megatron_vp2o.distributed.init import init_parallel

    init_parallel(vp2o_config())
    results = {}
    for dtype, distopt, where in COMBOS:
        res = one_combo(dtype, distopt, where)
        flags = [k for k, v in res.items() if isinstance(v, bool)]
        bad = torch.tensor([0.0 if res[k] else 1.0 for k in flags])
        dist.all_reduce(bad)
        res.update({k: bool(b == 0) for k, b in zip(flags, bad.tolist())})
        results[(dtype, distopt, where)] = res
    return {"world": dist.get_world_size(), "results": results}

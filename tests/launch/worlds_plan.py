"""Rank code for tests/launch/test_plan.py: build the tiny recipe with the trainer's own builder
and measure the bytes its live objects hold."""

from __future__ import annotations

import dataclasses

import torch

from megatron_vp2o.distributed.init import init_parallel
from megatron_vp2o.distributed.trust_region import ParamSnapshot, _states, main_param_entries
from megatron_vp2o.recipes import tiny_cpu
from megatron_vp2o.training.setup import build_trainable


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def live_bytes(cfg) -> dict:
    """params / grads / optimizer / snapshot bytes held by the built objects after one step."""
    trainable = build_trainable(cfg)
    params = list(trainable.module.parameters())
    for p in params:  # one optimizer step so Adam's lazy state exists (zero gradients)
        p.main_grad.zero_()
    trainable.optimizer.step()
    storages = {p.untyped_storage().data_ptr() for p in params}
    masters = [m for _, m, _ in main_param_entries(trainable.optimizer)
               if m.untyped_storage().data_ptr() not in storages]
    state = [v for s in _states(trainable.optimizer).values() for v in s.values() if torch.is_tensor(v)]
    snap = ParamSnapshot(trainable.model, trainable.optimizer).take()
    return {"params": _nbytes(params), "grads": _nbytes(p.main_grad for p in params),
            "optimizer": _nbytes(masters) + _nbytes(state), "tr_snapshot": _nbytes(snap._buffers),
            "tensors": len(params)}


def measure(payload) -> dict:
    cfg = tiny_cpu()
    init_parallel(cfg)
    out = {"fp32": live_bytes(cfg)}
    bf16 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, params_dtype="bf16"))
    out["bf16"] = live_bytes(bf16)
    return out

"""Rank code for tests/plan/test_plan.py: build the tiny recipe with the trainer's own builder
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


def _saved_bytes(cfg, tokens_BS) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of the model."""
    model = build_trainable(cfg).module
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    batch, seq = tokens_BS
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq), device="cpu")
    positions = torch.arange(seq, device="cpu").expand(batch, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, positions, attention_mask=None)
    return sum(seen.values())


def activations(payload) -> dict:
    """Saved-for-backward bytes of one MoE layer: a 2-layer model minus a 1-layer model."""
    cfg = tiny_cpu()
    model = dataclasses.replace(cfg.model, **payload["model"])
    cfg = dataclasses.replace(cfg, model=model)
    init_parallel(cfg)
    out = {}
    for layers in (2, 1):  # the larger first: megatron sizes its global aux-loss tracker on first use
        sized = dataclasses.replace(cfg, model=dataclasses.replace(model, num_layers=layers))
        out[layers] = _saved_bytes(sized, payload["tokens_BS"])
    return {"per_layer": out[2] - out[1]}

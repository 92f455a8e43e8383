"""Rank code for tests/plan/test_plan.py: ``vp2o plan --check`` in-process (as is, and with a plan
row made wrong on purpose) and one MoE layer's saved-for-backward bytes, in one 1-rank world."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import torch

from megatron_vp2o.cli.main import main
from megatron_vp2o.distributed.init import init_parallel
from megatron_vp2o.plan import memory
from megatron_vp2o.recipes import tiny_cpu
from megatron_vp2o.training.setup import build_trainable


def _plan_check(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def check(payload) -> dict:
    """The live check as the CLI runs it, then with ``prototypes`` planned 4 bytes too high, then the
    per-layer activation measurement (the world is ours: the CLI leaves it up)."""
    init_parallel(tiny_cpu(), sft_batch=False)
    result = {"ok": _plan_check(["plan", "--recipe", "tiny_cpu", "--check"])}
    right = memory.prototype_bytes
    memory.prototype_bytes = lambda cfg, moe_layers: right(cfg, moe_layers) + 4
    try:
        result["wrong"] = _plan_check(["plan", "--recipe", "tiny_cpu", "--check"])
    finally:
        memory.prototype_bytes = right
    result["per_layer"] = activations(payload)
    return result


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


def activations(payload) -> int:
    """Saved-for-backward bytes of one MoE layer: a 2-layer model minus a 1-layer model."""
    cfg = tiny_cpu()
    model = dataclasses.replace(cfg.model, **payload["model"])
    out = {}
    for layers in (2, 1):  # the larger first: megatron sizes its global aux-loss tracker on first use
        sized = dataclasses.replace(cfg, model=dataclasses.replace(model, num_layers=layers))
        out[layers] = _saved_bytes(sized, payload["tokens_BS"])
    return out[2] - out[1]

"""Functions that run inside the 2-rank conversion world of tests/checkpoint/test_roundtrip.py.

One world does everything for both architectures (world start-up dominates the cost on CPU):
import with EP=2 and EP=1 (both verified against transformers), reload each checkpoint under the
other EP size, record where every expert's weights landed on every rank, export back to HF, and
check that a failed verification leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _local_experts(model, cfg) -> dict:
    """{(layer, global expert): (fc1, fc2)} held by this rank."""
    from megatron_vp2o.checkpoint.convert_hf import shards_of

    sh = shards_of(model, cfg)
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        for j, expert in enumerate(layer.mlp.experts.local_experts):
            out[(sh.layer_offset[i], sh.expert_offset[i][j])] = (expert.linear_fc1.weight.detach().clone(),
                                                                  expert.linear_fc2.weight.detach().clone())
    return out


def _placement_and_logits(ckpt, cfg, ep: int, ids) -> dict:
    """Load ``ckpt`` with EP=``ep``: every rank's experts (gathered) and the logits."""
    import dataclasses

    from megatron_vp2o.checkpoint.convert_hf import load_fp32, megatron_logits

    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep))
    model, cfg = load_fp32(ckpt, cfg)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, _local_experts(model, cfg))
    return {"experts_per_rank": per_rank, "logits": megatron_logits(model, ids, cfg.model.vocab_size)}


def _prototypes(ckpt, cfg, ep: int) -> dict:
    """Load ``ckpt`` strictly into VP2O layers with EP=``ep``: saved prototypes vs recomputed from the weights."""
    import dataclasses

    from megatron_vp2o.checkpoint import load_model
    from megatron_vp2o.checkpoint.convert_hf import build_model, recompute_prototypes, start_world

    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep))
    start_world(cfg)
    model = build_model(cfg, with_prototypes=True)
    load_model(ckpt, [model])
    from megatron_vp2o.moe.layer import vp2o_layers

    saved = [layer.protos_XD.clone() for layer in vp2o_layers(model)]
    n = recompute_prototypes(model, cfg)
    diff = max((a - layer.protos_XD).abs().max().item() for a, layer in zip(saved, vp2o_layers(model)))
    norms = torch.cat([a.norm(dim=-1) for a in saved])
    return {"layers": n, "max_diff": diff, "norm_min": norms.min().item(), "norm_max": norms.max().item()}


def roundtrip(payload):
    from megatron_vp2o.checkpoint import convert_hf
    from megatron_vp2o.checkpoint.hf import ConversionError

    root = Path(payload["root"])
    results = {}
    for name, hf_dir in payload["models"].items():
        res = results[name] = {}
        for ep in (2, 1):
            res[f"ep{ep}"] = convert_hf.import_hf(hf_dir, root / f"{name}_ep{ep}", ep=ep, verify=True)
        _, _, model_cfg = convert_hf.prepare_import(hf_dir)
        cfg = convert_hf.world_config(model_cfg, world=dist.get_world_size())
        ids = convert_hf.random_tokens(model_cfg.vocab_size, seed=3)
        res["ep2_as_ep1"] = _placement_and_logits(root / f"{name}_ep2", cfg, 1, ids)
        res["ep1_as_ep2"] = _placement_and_logits(root / f"{name}_ep1", cfg, 2, ids)
        res["protos"] = _prototypes(root / f"{name}_ep2", cfg, 1)
        res["export"] = convert_hf.export_hf(root / f"{name}_ep2", root / f"{name}_hf")
        if name != payload["fail_verify"]:
            continue
        try:
            convert_hf.import_hf(hf_dir, root / f"{name}_bad", ep=2, verify=True, tol=-1.0)
            res["failed_verify"] = "no error"
        except ConversionError as exc:
            res["failed_verify"] = str(exc)
        dist.barrier()
        res["bad_left"] = sorted(p.name for p in root.iterdir() if "bad" in p.name)
    results["ids"] = ids
    return results

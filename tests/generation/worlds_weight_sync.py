"""Functions that run inside the two-rank world of tests/generation/test_weight_sync.py.

``layouts`` loads the tiny policy (a reshardable dist checkpoint) into TP=2, EP=2 (with grouped experts
too), PP=2 and TP=1 (two data-parallel ranks) layouts in turn and streams the full model's HF tensors
(checkpoint/hf/stream.py, what the weight refresh sends) on every rank; each layout's tensors must equal the
TP=1 ones on both ranks. Returns plain numbers per layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "ep2_grouped": {"ep": 2}, "pp2": {"pp": 2}}


def _stream(parallel: dict, model_over: dict | None = None) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state as ps

    from megatron_vp2o.checkpoint import load_model
    from megatron_vp2o.checkpoint.convert_hf import shards_of
    from megatron_vp2o.checkpoint.hf import stream
    from megatron_vp2o.config import load_config
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.generation.vllm_engine import hf_architecture
    from megatron_vp2o.model import build_gpt, transformer_config

    over = [f"parallel.{k}={v}" for k, v in parallel.items()]
    over += [f"model.{k}={v}" for k, v in (model_over or {}).items()]
    cfg = load_config("examples/configs/tiny_cpu.yaml", over)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_parallel(cfg)
    model = build_gpt(cfg.model, transformer_config(cfg.model, cfg.parallel))
    load_model("checkpoints/tiny_policy", [model])
    arch, _ = hf_architecture(cfg.model)
    pairs = stream.hf_tensors([model], [shards_of(model, cfg)], arch, cfg.model.vocab_size,
                              stream.Groups.from_parallel_state())
    got = {n: t.detach().clone() for n, t in pairs}
    buckets = list(stream.buckets(got.items(), 1 << 20))
    got["__bucket_sizes__"] = torch.tensor([sum(t.numel() * t.element_size() for _, t in b) for b in buckets],
                                           device="cpu")
    return got


def layouts(payload) -> dict:
    ref = _stream({})
    sizes = ref.pop("__bucket_sizes__")
    out = {"num_tensors": len(ref), "max_bucket": int(sizes.max()), "biggest_tensor": max(
        t.numel() * t.element_size() for t in ref.values()), "num_buckets": len(sizes)}
    for name, par in LAYOUTS.items():
        got = _stream(par, {"expert_impl": "grouped"} if "grouped" in name else None)
        got.pop("__bucket_sizes__")
        same_names = set(got) == set(ref)
        diff = max(((got[k].float() - ref[k].float()).abs().max().item() for k in ref if k in got), default=1.0)
        flags = torch.tensor([float(same_names), diff], dtype=torch.float64, device="cpu")
        parts = [torch.zeros_like(flags) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flags)
        out[name] = {"same_names": all(p[0] == 1.0 for p in parts), "max_diff": max(p[1].item() for p in parts)}
    return out

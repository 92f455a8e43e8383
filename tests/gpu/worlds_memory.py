"""Rank code for tests/gpu/test_memory_plan.py: torch.cuda.max_memory_allocated of one tiny VP2O and
one tiny GRPO-shaped learner step (the plan's own config) against `vp2o plan`'s peak."""

from __future__ import annotations

import dataclasses
import os

import torch


def warm_up_cuda_libraries() -> None:
    """Products before any measurement, in fp32 and bf16, with and without bias (cuBLAS and cuBLASLt),
    forward and backward: each library takes its workspace (32 MiB apiece on Hopper) from the caching
    allocator at its first product on a stream, which would count against whichever algorithm is
    measured first (the first H100 run measured VP2O first: 125 MiB against a CPU replay's 63)."""
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(64, 64, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.zeros(64, device="cuda", dtype=dtype, requires_grad=True)
        (torch.nn.functional.linear(w, w, b).sum() + (w @ w).sum()).backward()
    torch.cuda.synchronize()


def measure(payload) -> dict:
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.moe import vp2o_moe_layer
    from megatron_vp2o.plan import plan_rank
    from megatron_vp2o.recipes import tiny_cpu
    from megatron_vp2o.training.setup import build_trainable
    from megatron_vp2o.training.step import train_step
    from megatron_vp2o.rl.learner.vp2o import capture_anchors, init_vp2o, vp2o_train_step

    from distributed.worlds_foundation import my_micro_batches

    base = tiny_cpu()
    init_parallel(base)
    warm_up_cuda_libraries()
    snapshots = os.environ.get("VP2O_MEMORY_SNAPSHOT")  # a folder: each algorithm's allocator history
    out = {}
    for algo in payload.get("order", ("vp2o", "grpo")):
        cfg = dataclasses.replace(base, rl=dataclasses.replace(base.rl, algo=algo))
        seq, micro = cfg.model.seq_length, cfg.rl.micro_batch_size
        num = cfg.rl.prompts_per_step * cfg.rl.policy_loss.group_size
        ids = torch.randint(3, cfg.model.vocab_size - 1, (num, seq + 1))
        import distributed.worlds_foundation as wf

        wf.MICRO_BATCH = micro
        mbs = my_micro_batches(ids)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if snapshots:
            torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
        if algo == "vp2o":
            tr = build_trainable(cfg, moe_layer_cls=vp2o_moe_layer(cfg.vp2o.specialization))
            state = init_vp2o(tr, cfg.vp2o, False)
            for _ in range(2):  # the second step has Adam's state and the snapshot
                vp2o_train_step(tr, mbs, state, anchors=capture_anchors(tr, mbs, state))
        else:
            tr = build_trainable(cfg)
            for _ in range(2):
                train_step(tr, mbs)
        torch.cuda.synchronize()
        if snapshots:
            trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
            torch.cuda.memory._record_memory_history(enabled=None)
            with open(os.path.join(snapshots, f"{algo}_peak.txt"), "w") as f:
                f.write(peak_breakdown(trace))
        out[algo] = {"measured": torch.cuda.max_memory_allocated() - start, "plan": plan_rank(cfg, 1).peak}
        del tr
    return out


def _site(frames: list) -> str:
    """Where an allocation came from: the innermost frame of the project, then of megatron."""
    for key in ("megatron_vp2o", "megatron/core", "tests/"):
        for fr in frames:
            if key in fr.get("filename", ""):
                return f"{fr['filename'].split(key)[-1].lstrip('/')}:{fr['line']} {fr.get('name', '')} [{key}]"
    return frames[0]["filename"] + ":" + str(frames[0]["line"]) if frames else "?"


def peak_breakdown(trace: list, top: int = 25) -> str:
    """Replay an allocator trace (torch.cuda.memory._snapshot): at the peak of live bytes, the live
    blocks grouped by allocation site, largest first."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for ev in trace:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = (ev["size"], _site(ev.get("frames", [])))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    by_site: dict = {}
    for size, site in at_peak.values():
        n, b = by_site.get(site, (0, 0))
        by_site[site] = (n + 1, b + size)
    rows = sorted(by_site.items(), key=lambda kv: -kv[1][1])[:top]
    lines = [f"peak live {peak / 2**20:.2f} MiB in {len(at_peak)} blocks (since the measurement began)"]
    lines += [f"{b / 2**20:9.2f} MiB {n:5d} x  {site}" for site, (n, b) in rows]
    return "\n".join(lines) + "\n"

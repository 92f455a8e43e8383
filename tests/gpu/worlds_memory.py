"""Rank code for tests/gpu/test_memory_plan.py: torch.cuda.max_memory_allocated of one tiny VP2O and
one tiny GRPO-shaped learner step (the plan's own config) against `vp2o plan`'s peak."""

from __future__ import annotations

import dataclasses

import torch


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
    out = {}
    for algo in ("vp2o", "grpo"):
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
        out[algo] = {"measured": torch.cuda.max_memory_allocated() - start, "plan": plan_rank(cfg, 1).peak}
        del tr
    return out

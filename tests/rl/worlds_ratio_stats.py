"""World function for test_ratio_stats.py: the first learner update of the tiny recipe (VP2O, trust
region on: post-step re-route) with every recorded micro-batch's log-ratios kept for the test."""

from __future__ import annotations

from pathlib import Path


def first_update(payload):
    from megatron_vp2o.config import load_config
    from megatron_vp2o.rl.learner import forward
    from megatron_vp2o.rl.session import build_session
    from megatron_vp2o.rl.trainer import LoopState, refresh

    cfg = load_config("examples/configs/tiny_cpu.yaml", payload["overrides"])
    sess = build_session(cfg, Path(payload["out"]), False)
    state = LoopState()
    refresh(sess, state)
    recorded, record = [], forward.record_ratios

    def keep(log, logp_BS, logp_old_BS, mask_BS):
        lr = (logp_BS.detach().float() - logp_old_BS.float())[mask_BS > 0]
        recorded.append((int(lr.numel()), float(lr.abs().max()) if lr.numel() else 0.0))
        record(log, logp_BS, logp_old_BS, mask_BS)

    forward.record_ratios = keep
    try:
        row = sess.learner.step(sess.batches, state.anchors).logged()
    finally:
        forward.record_ratios = record
    loss_tokens = [int(b.loss_mask.sum()) for b in sess.batches]
    sess.close()
    return {"row": row, "recorded": recorded, "loss_tokens": loss_tokens}

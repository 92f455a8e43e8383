"""World function for test_engine_is_run.py: one refresh and two learner updates of the tiny recipe
(megatron engine) with the given overrides; optionally the buffer's engine log-probs are shifted by
``shift`` on every response token (a fake engine mismatch) before the learner batches are rebuilt.
Returns a digest of every parameter, the refresh's metrics and the updates' logged metrics."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path


def updates(payload):
    import torch

    from megatron_vp2o.config import load_config
    from megatron_vp2o.rl.session import build_session
    from megatron_vp2o.rl.trainer import LoopState, refresh

    cfg = load_config("examples/configs/tiny_cpu.yaml", payload["overrides"])
    sess = build_session(cfg, Path(payload["out"]), False)
    state = LoopState()
    metrics = refresh(sess, state)
    if payload.get("shift"):
        r = state.buffer.rollouts
        state.buffer.rollouts = dataclasses.replace(r, engine_logp_BT=r.logp_BT - payload["shift"] * r.response_mask_BT)
        sess.batches = sess.make_batches(state.buffer)
        metrics |= sess.reward_metrics(state.buffer)
    rows = [sess.learner.step(sess.batches, state.anchors).logged() for _ in range(2)]
    digest = hashlib.sha256()
    for p in sess.trainable.module.parameters():
        digest.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    sess.close()
    return {"params": digest.hexdigest(), "refresh": metrics, "rows": rows}

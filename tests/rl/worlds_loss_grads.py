"""World function for test_loss_grads.py: two learner updates of the tiny recipe with the
loss-gradient diagnostic on or off; returns a digest of every parameter and the logged metrics."""

from __future__ import annotations

import hashlib
from pathlib import Path


def updates(payload):
    import torch

    from megatron_vp2o.config import load_config
    from megatron_vp2o.rl.session import build_session
    from megatron_vp2o.rl.trainer import LoopState, refresh

    cfg = load_config("examples/configs/tiny_cpu.yaml", payload["overrides"])
    sess = build_session(cfg, Path(payload["out"]), False)
    refresh(sess, LoopState())
    rows = [sess.learner.step(sess.batches, None).logged() for _ in range(2)]
    digest = hashlib.sha256()
    for p in sess.trainable.module.parameters():
        digest.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    sess.close()
    return {"params": digest.hexdigest(), "rows": rows}

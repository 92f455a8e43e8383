"""World functions for test_rl.py: the trainer's non-finite guards on a real 1-rank session."""

from __future__ import annotations

from pathlib import Path

import torch


def _params(sess):
    return {k: v.detach().clone() for k, v in sess.trainable.module.state_dict().items() if torch.is_tensor(v)}


def nonfinite_guards(payload):
    from megatron_vp2o.config import load_config
    from megatron_vp2o.rl.batches import make_batches
    from megatron_vp2o.rl.trainer import LoopState, refresh, update
    from megatron_vp2o.rl.session import build_session

    cfg = load_config("examples/configs/tiny_cpu.yaml", payload["overrides"])
    sess = build_session(cfg, Path(payload["out"]), False)
    state = LoopState()
    refresh(sess, state)
    out = {}
    before = _params(sess)
    good_adv = state.buffer.adv_B.clone()
    state.buffer.adv_B[0] = float("nan")
    out["nan_adv"] = update(sess, state).logged()
    out["nan_adv_unchanged"] = all(torch.equal(before[k], v) for k, v in _params(sess).items())
    state.buffer.adv_B.copy_(good_adv)
    clean = sess.batches
    bad = make_batches(state.buffer.rollouts, state.buffer.adv_B, cfg.rl.micro_batch_size, sess.pad_to,
                       aggregation=cfg.rl.policy_loss.aggregation)
    bad[0].logp_old[bad[0].loss_mask > 0] = float("nan")  # NaN ratio -> NaN loss and gradients
    sess.batches = bad
    out["nan_grad"] = update(sess, state).logged()
    out["nan_grad_unchanged"] = all(torch.equal(before[k], v) for k, v in _params(sess).items())
    sess.batches = clean
    out["clean"] = update(sess, state).logged()
    after = _params(sess)
    out["clean_changed"] = any(not torch.equal(before[k], after[k]) for k in before)
    out["finite_after"] = all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    return out

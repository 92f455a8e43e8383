"""World function for test_response_mask.py: the VP2O statistics of one RL buffer, measured again
after adding tokens that are not response tokens (left padding, a prompt-only sequence)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


def _left_padded(batches, extra: int, pad_id: int):
    """Each micro-batch with ``extra`` more left-pad columns (masked keys, no loss)."""
    from megatron_vp2o.generation.rollouts import attention_mask

    out = []
    for mb in batches:
        b, s = mb.tokens.shape
        pads_B = mb.attention_mask[:, 0, -1].sum(-1)  # the last query masks exactly the pad keys
        cols = lambda t, v: torch.cat([t.new_full((b, extra), v), t], dim=1)  # noqa: E731
        out.append(dataclasses.replace(
            mb, tokens=cols(mb.tokens, pad_id), labels=cols(mb.labels, pad_id),
            positions=torch.cat([mb.positions[:, :1].expand(b, extra), mb.positions], dim=1),
            attention_mask=attention_mask(pads_B + extra, s + extra, s + extra),
            loss_mask=cols(mb.loss_mask, 0.0), logp_old=cols(mb.logp_old, 0.0),
            logp_ref=None if mb.logp_ref is None else cols(mb.logp_ref, 0.0)))
    return out


def _with_prompt_only_row(batches):
    """Each micro-batch plus a copy of its first sequence that has no response token to count."""
    out = []
    for mb in batches:
        extra = {f.name: getattr(mb, f.name) for f in dataclasses.fields(mb)}
        for name, value in extra.items():
            if torch.is_tensor(value):
                row = value[:1].clone()
                if name in ("loss_mask", "adv"):
                    row.zero_()
                extra[name] = torch.cat([value, row])
        out.append(type(mb)(**extra))
    return out


def _measure(sess, batches, anchors) -> dict:
    from megatron_vp2o.distributed.stein_hook import apply_stein
    from megatron_vp2o.distributed.trust_region import anchor_statistic
    from megatron_vp2o.moe.layer import flush_step_stats
    from megatron_vp2o.platform import native
    from megatron_vp2o.rl.learner.forward import _grad_tensors
    from megatron_vp2o.training.step import reduce_report
    from megatron_vp2o.rl.learner.vp2o import _forward_backward, global_token_counts, set_loss_normalizers

    layers = sess.vp2o.layers
    lm_tokens, routed = global_token_counts(batches)
    set_loss_normalizers(layers, lm_tokens, routed)
    for layer in layers:
        layer.reset_step_stats()
        layer.capture = True
    losses = _forward_backward(sess.trainable, batches, sess.forward_step)
    flush_step_stats(layers)
    out = {"routed": routed, "loss": reduce_report(losses).clone(),
           "counts": [layer.counts_EE.clone() for layer in layers],
           "spec_losses": [layer.loss_log.clone() for layer in layers],
           "d_anc": anchor_statistic(layers, anchors).clone()}
    with native():
        apply_stein(sess.trainable.model, layers, sess.vp2o.groups, sess.vp2o.cfg.stein, routed)
    out["active"] = [layer.active_E.clone() for layer in layers]
    out["grads"] = [g.detach().clone() for g in _grad_tensors(sess.trainable)]
    for layer in layers:
        layer.capture = False
        layer.reset_step_stats()
    return out


def response_mask(payload):
    from megatron_vp2o.config import load_config
    from megatron_vp2o.rl.session import build_session
    from megatron_vp2o.rl.trainer import LoopState, refresh
    from megatron_vp2o.rl.learner.vp2o import capture_anchors

    cfg = load_config("examples/configs/tiny_cpu.yaml", payload["overrides"])
    sess = build_session(cfg, Path(payload["out"]), False)
    refresh(sess, LoopState())
    plain = sess.batches
    variants = {"plain": plain, "left_pad": _left_padded(plain, 3, sess.tokenizer.pad_id),
                "prompt_row": _with_prompt_only_row(plain)}
    anchors = {name: capture_anchors(sess.trainable, mbs, sess.vp2o, forward_step=sess.forward_step)
               for name, mbs in variants.items()}
    sess.learner.step(sess.batches, None)  # move the learner away from the anchors, so D_anc > 0
    out = {name: _measure(sess, mbs, anchors[name]) for name, mbs in variants.items()}
    out["response_tokens"] = float(sum(mb.loss_mask.sum() for mb in plain))
    out["all_tokens"] = float(sum(mb.tokens.numel() for mb in plain))
    out["top_k"] = cfg.model.moe_router_topk
    sess.close()
    return out

"""World function for test_anchor_gates.py: D_anc of a VP2O step measured against the routing of
the post-step weights, computed here from a fresh forward-only pass and the algo reference."""

from __future__ import annotations

from pathlib import Path

import torch


def _d_anc(routing, anchors) -> float:
    """D_anc (method §2.10) of ``routing`` [(protos, topk, gates, counted) per layer] against
    ``anchors``, from the algo reference function, one layer at a time."""
    from megatron_vp2o.algo import trust_region as tr

    total = count = 0.0
    for (protos, topk, gates, counted), (a_protos, a_topk, a_gates, _) in zip(routing, anchors):
        s, c = tr.anchor_distance_sum(topk, gates, protos, a_topk, a_gates, a_protos, counted)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def anchor_gates(payload):
    from megatron_vp2o.config import load_config
    from megatron_vp2o.rl.learner.vp2o import capture_anchors
    from megatron_vp2o.rl.session import build_session
    from megatron_vp2o.rl.trainer import LoopState, refresh

    cfg = load_config("examples/configs/tiny_cpu.yaml", payload["overrides"])
    sess = build_session(cfg, Path(payload["out"]), False)
    refresh(sess, LoopState())
    batches, learner, state = sess.batches, sess.learner, sess.vp2o
    capture = lambda: capture_anchors(sess.trainable, batches, state, forward_step=sess.forward_step)  # noqa: E731
    anchors = capture()
    learner.step(batches, None)  # move the learner away from the anchors (no budget), so D_anc > 0
    budget = state.cfg.trust_region
    out = {}

    # accept branch: a budget the step cannot break
    budget.anchor_delta, budget.on_violation = 2.0, "backtrack"
    pre = capture()  # the gates of the forward before the step (what D_anc used to combine)
    accepted = learner.step(batches, anchors)
    post = capture()  # the post-step weights' own routing and prototypes
    stale = [(p_post[0], p_pre[1], p_pre[2], p_pre[3]) for p_pre, p_post in zip(pre, post)]
    out["accept"] = {"trace": accepted.d_anc_trace, "decision": accepted.decision,
                     "fresh": _d_anc(post, anchors), "stale": _d_anc(stale, anchors)}

    # reject branch: a budget every attempt breaks; the weights come back bitwise
    budget.anchor_delta = 1e-9
    params = [p.detach().clone() for p in sess.trainable.module.parameters()]
    rejected = learner.step(batches, anchors)
    out["reject"] = {"trace": rejected.d_anc_trace, "decision": rejected.decision,
                     "anchor_failed": rejected.anchor_failed, "scales": len(budget.backtrack_scales),
                     "restored": all(torch.equal(a, b.detach())
                                     for a, b in zip(params, sess.trainable.module.parameters()))}

    # anchor_gates=pre_step: the step's own forward gates with post-step prototypes, no extra pass
    budget.anchor_delta, budget.anchor_gates = 2.0, "pre_step"
    pre = capture()
    cheap = learner.step(batches, anchors)
    post = capture()
    stale = [(p_post[0], p_pre[1], p_pre[2], p_pre[3]) for p_pre, p_post in zip(pre, post)]
    out["pre_step"] = {"trace": cheap.d_anc_trace, "fresh": _d_anc(post, anchors), "stale": _d_anc(stale, anchors)}

    # anchor_micro_batches=1: anchor and post-step re-route on the first micro-batch only
    budget.anchor_gates, budget.anchor_micro_batches = "post_step", 1
    first = capture()
    sub = learner.step(batches, first)
    post = capture()
    out["subset"] = {"trace": sub.d_anc_trace, "fresh": _d_anc(post, first),
                     "tokens": int(first[0][1].shape[0]), "all_tokens": int(anchors[0][1].shape[0]),
                     "first_tokens": int(batches[0].tokens.numel()), "micro_batches": len(batches)}
    sess.close()
    return out

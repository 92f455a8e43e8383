"""``vp2o train``: VP2O (or the GRPO baseline) RL on megatron-core, as short timed phases.

One learner step (spec 2.10-2.12; STYLE 8)::

    logprobs      learner log-probs on the buffer -> drift D_beh, ESS         (vp2o, event refresh)
    refresh?      no buffer | every_step | D_beh > delta | ESS < eta | anchor failed | max steps
      rollout     actors (= current weights) generate G responses per prompt, logging mu and routing
      reward      reward registry (failures recorded, never raised)
      advantages  group-relative advantages (spec 2.2); anchor snapshot of routing + prototypes
    update        vp2o: Stein transport + specialisation losses + trust region (training/vp2o_step)
                  grpo: clipped policy loss, plain megatron step
    (checkpoint)  every ``checkpoint.every`` steps, atomically, with the buffer and counters

A non-finite advantage, loss or gradient skips the step (logged); the weights do not change.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_vp2o.rl.actor import ActorBatch, act, reward_metrics
from megatron_vp2o.rl.learner import behaviour_stats
from megatron_vp2o.rl.session import Session


@dataclass
class LoopState:
    step: int = 0
    refreshes: int = 0
    steps_since_refresh: int = 0
    force_refresh: bool = True
    skipped: int = 0
    buffer: ActorBatch | None = None
    behaviour: dict | None = None
    anchors: list | None = None
    timing: dict = field(default_factory=dict)


@contextmanager
def phase(state: LoopState, name: str):
    t0 = time.perf_counter()
    yield
    state.timing[f"timing/{name}"] = state.timing.get(f"timing/{name}", 0.0) + time.perf_counter() - t0


def refresh(sess: Session, state: LoopState) -> dict:
    """Actors <- learner; new rollouts, rewards, advantages, anchor snapshot (spec 2.12)."""
    with phase(state, "rollout"):
        batch = act(sess.engine, sess.tokenizer, sess.prompts, sess.cfg, state.refreshes, sess.cfg.train.seed)
    with phase(state, "reward"):
        metrics = reward_metrics(batch, sess.cfg.rl.policy_loss.group_size)
    with phase(state, "advantages"):
        state.buffer, state.refreshes, state.steps_since_refresh = batch, state.refreshes + 1, 0
        batch.logp_ref_BT = sess.reference_logprobs(batch.rollouts)
        sess.batches = sess.make_batches(batch)
        state.anchors = sess.capture_anchors() if sess.vp2o is not None else None
    return metrics


def needs_refresh(sess: Session, state: LoopState) -> tuple[bool, dict]:
    """The refresh rule (spec 2.12) on the current learner; also sets ``state.behaviour``."""
    state.behaviour = None
    if state.buffer is None or state.force_refresh or sess.cfg.rl.refresh_policy == "every_step":
        return True, {}
    with phase(state, "logprobs"):
        stats = behaviour_stats(sess.trainable, sess.batches, sess.cfg.rl, sess.vocab_size, sess.ess_temper)
    tr = sess.cfg.vp2o.trust_region
    use = sess.cfg.rl.ablate.behaviour_budget
    state.behaviour = stats if use else None
    need = (use and (float(stats["drift"]) > tr.drift_delta or float(stats["ess"]) < tr.ess_min)) \
        or state.steps_since_refresh >= tr.max_steps_per_refresh
    return need, {"vp2o/drift": float(stats["drift"]), "vp2o/ess": float(stats["ess"])}


def update(sess: Session, state: LoopState) -> dict:
    """One learner update on the buffer (vp2o or grpo); skipped if anything is non-finite."""
    if not bool(torch.isfinite(state.buffer.adv_B).all()):
        return {"skipped": True, "skip_reason": "non-finite advantages"}
    with phase(state, "update"):
        if sess.vp2o is not None:
            out = sess.vp2o_step(state.anchors if sess.cfg.rl.ablate.anchor_budget else None, state.behaviour)
        else:
            out = sess.grpo_step()
    state.steps_since_refresh += 1
    if out.get("vp2o/refresh") or out.get("vp2o/decision") in ("reject", "refresh"):
        state.force_refresh = True
    return out


def rl_step(sess: Session, state: LoopState) -> dict:
    state.timing = {}
    metrics = {}
    need, stats = needs_refresh(sess, state)
    metrics |= stats
    if need:
        metrics |= refresh(sess, state)
        state.force_refresh = False
    else:
        metrics |= sess.last_reward_metrics
    sess.last_reward_metrics = {k: v for k, v in metrics.items() if k.startswith("reward/")}
    out = update(sess, state)
    if out.get("skipped"):
        state.skipped += 1
    metrics |= out
    metrics |= {"loss": out.get("loss", float("nan")), "vp2o/refreshes": state.refreshes,
                "vp2o/refreshed": need, "skipped_steps": state.skipped, **state.timing}
    return metrics


def run_rl(cfg, out_dir: str | Path, resume: bool = False) -> dict:
    """Train for ``cfg.rl.steps`` learner updates; returns a summary."""
    sess = Session.start(cfg, Path(out_dir), resume)
    state = sess.restore_loop_state(LoopState())
    t_start = time.perf_counter()
    first_eval = sess.evaluate("eval") if state.step == 0 else {}
    if first_eval:
        sess.logger.log(0, first_eval)
    while state.step < cfg.rl.steps:
        state.step += 1
        t0 = time.perf_counter()
        metrics = rl_step(sess, state)
        metrics["timing/step"] = time.perf_counter() - t0
        if cfg.rl.eval_every and state.step % cfg.rl.eval_every == 0 and state.step < cfg.rl.steps:
            metrics |= sess.evaluate("eval")
        if state.step == cfg.rl.steps:
            metrics |= sess.evaluate("eval")
        sess.logger.log(state.step, metrics)
        sess.progress.update(f"reward {metrics.get('reward/mean', float('nan')):.3f}")
        periodic = cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0
        if periodic or (cfg.checkpoint.save_final and state.step == cfg.rl.steps):
            sess.save(state)
    sess.close()
    return sess.summary(first_eval, metrics if cfg.rl.steps else {}, state, time.perf_counter() - t_start)

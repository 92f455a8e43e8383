"""``vp2o train``: VP2O (or the GRPO baseline) RL on megatron-core, as short timed phases.

One RL step (method §2.10-2.12; CONTRIBUTING.md §8)::

    refresh       when the last step's decision says so (``start`` on the first step):
      rollout     actors (= current weights) generate G responses per prompt, logging mu and routing
      reward      reward registry (failures recorded, never raised)
      advantages  group-relative advantages (method §2.2); anchor snapshot of routing + prototypes
    update        the learner (``rl.learner``: ``Learner.step -> StepOutcome``)
                  vp2o: one learner step: Stein transport + specialisation losses + anchor trust region
                  (or ``rl.vp2o``'s mini-batch epochs of such steps, without the anchor budget)
                  grpo: ``rl.grpo.epochs`` x ``rl.grpo.mini_batches`` clipped optimizer steps on the batch
    logprobs      the refresh rule for the next step, once, in `refresh_decision` (through
                  algo.trust_region.refresh_reason, which names its reason): forced | every_step | anchor
                  (this update failed its budget) | drift | ess (learner log-probs on the buffer -> D_beh,
                  ESS) | max_steps | none
    (budget)      a refresh due with ``rl.budget.samples`` spent ends the run (after a final evaluation)
    (checkpoint)  every ``checkpoint.every`` steps, atomically, with the buffer and counters

Every step logs ``vp2o/refresh_reason`` (``none`` when the buffer is kept), ``rollout/samples`` and
``rollout/tokens`` (cumulative training responses and response tokens generated) and
``timing/elapsed_s``; ``reward/*`` only on steps that generated a batch. A non-finite advantage
forces a refresh (``forced``); a non-finite loss or gradient skips the step (logged); skipped
steps leave the weights unchanged.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from megatron_vp2o.algo import trust_region as tr
from megatron_vp2o.config import ConfigError
from megatron_vp2o.launch.signals import StopOnSignal
from megatron_vp2o.rl.learner import StepOutcome
from megatron_vp2o.rl.session import Evaluate, build_session
from megatron_vp2o.rl.state import LoopState, phase

__all__ = ["LoopState", "REFRESH_REASONS", "budget_spent", "phase", "refresh", "refresh_decision", "rl_step",
           "run_rl", "update"]

# The rule's reasons (algo.trust_region.REASONS), then the refreshes owed whatever the rule says.
REFRESH_REASONS = tr.REASONS + ("start", "every_step", "forced")


def refresh_every_step(cfg) -> bool:
    """Actors refreshed for every learner update: rl.refresh=every_step (grpo's default), or a VP2O run
    with its trust region off (``vp2o.trust_region.enabled=false``: "refresh every rollout batch") or
    with VP2O off altogether (``vp2o.enabled=false``: plain megatron layers and steps)."""
    vp2o = cfg.vp2o
    return cfg.rl.refresh_policy == "every_step" or (
        cfg.rl.algo == "vp2o" and not (vp2o.enabled and vp2o.trust_region.enabled))


def refresh_decision(state: LoopState, cfg, stats_fn) -> tuple[str, dict]:
    """The refresh rule (method §2.12, eq. 11), applied once per step, here only: (reason, logged stats).

    Taken after each update, for the next step. Owed refreshes come first (``start``: no buffer;
    ``forced``: the buffer is unusable), then
    ``every_step``. Otherwise ``algo.trust_region.refresh_needed`` on the current buffer's statistics
    (``stats_fn() -> {"drift", "ess"}``: the current learner against the buffer's mu; skipped when the
    anchor already failed or the behaviour budget is ablated), the last update's anchor verdict and the
    learner updates made on this buffer. NaN statistics count as violations. The reason is the one
    ``algo.trust_region.refresh_reason`` names (the first violated condition in the order anchor,
    drift, ess, max_steps), read to the host once.
    """
    if state.buffer is None:
        return "start", {}
    if state.forced:
        return "forced", {}
    if refresh_every_step(cfg):
        return "every_step", {}
    tr_cfg, use_stats = cfg.vp2o.trust_region, cfg.rl.ablate.behaviour_budget and not state.anchor_failed
    drift, ess, logged = float("nan"), float("nan"), {}
    if use_stats:
        stats = stats_fn()
        drift, ess = float(stats["drift"]), float(stats["ess"])
        logged = {"vp2o/drift": drift, "vp2o/ess": ess}
    code = tr.refresh_reason(drift if use_stats else 0.0, ess if use_stats else 1.0, state.anchor_failed,
                             state.steps_since_refresh, drift_delta=tr_cfg.drift_delta, ess_min=tr_cfg.ess_min,
                             max_steps_per_refresh=tr_cfg.max_steps_per_refresh)
    return tr.REASONS[int(code)], logged


def refresh(sess, state: LoopState) -> dict:
    """Actors <- learner; new rollouts, rewards, advantages, anchor snapshot (method §2.12)."""
    with phase(state, "rollout"):
        batch = sess.rollout(state.refreshes)
    with phase(state, "reward"):
        metrics = sess.reward_metrics(batch)
    with phase(state, "advantages"):
        state.buffer, state.refreshes, state.steps_since_refresh = batch, state.refreshes + 1, 0
        state.forced, state.anchor_failed = False, False
        state.anchors = sess.set_buffer(batch)
    state.samples += int(metrics.pop("rollout/new_samples"))
    state.tokens += int(metrics.pop("rollout/new_tokens"))
    return metrics


def update(sess, state: LoopState) -> StepOutcome:
    """The learner updates on the buffer (vp2o: one step; grpo: its mini-batch epochs); a non-finite
    advantage skips them and forces a refresh."""
    if not bool(torch.isfinite(state.buffer.adv_B).all()):
        state.forced = True
        return StepOutcome(loss=math.nan, skipped=True, skip_reason="non-finite advantages")
    with phase(state, "update"):
        outcome = sess.learner.step(sess.batches, state.anchors if sess.cfg.rl.ablate.anchor_budget else None)
    state.steps_since_refresh += 1
    state.anchor_failed = outcome.anchor_failed  # algo.trust_region.forces_refresh of its decision
    return outcome


def budget_spent(cfg, state: LoopState) -> bool:
    return cfg.rl.budget.samples > 0 and state.samples >= cfg.rl.budget.samples


def rl_step(sess, state: LoopState) -> dict:
    """One step (module docstring): the refresh decided at the end of the last step, the update, and
    the decision for the next step (``state.next_refresh``)."""
    state.timing, metrics = {}, {}
    reason = state.next_refresh or "none"
    if reason != "none":
        metrics |= refresh(sess, state)
    outcome = update(sess, state)
    if outcome.skipped:
        state.skipped += 1
    metrics |= outcome.logged()
    with phase(state, "logprobs"):
        upcoming, stats = refresh_decision(state, sess.cfg, sess.behaviour_stats)
    state.next_refresh = None if upcoming == "none" else upcoming
    metrics |= stats | {"loss": outcome.loss, "vp2o/refreshes": state.refreshes,
                        "vp2o/refresh_reason": reason, "vp2o/refreshed": reason != "none",
                        "skipped_steps": state.skipped, "rollout/samples": state.samples,
                        "rollout/tokens": state.tokens, **state.timing}
    return metrics


def _eval_due(cfg, state: LoopState, samples_before: int) -> bool:
    """Periodic evaluation: every ``rl.eval_every`` steps and each time ``rl.budget.eval_every``
    more training responses were generated (so runs compare at equal rollout cost)."""
    by_step = cfg.rl.eval_every and state.step % cfg.rl.eval_every == 0
    every = cfg.rl.budget.eval_every
    by_samples = every and state.samples // every > samples_before // every
    return bool(by_step or by_samples)


def run_rl(cfg, out_dir: str | Path, resume: bool = False, evaluate: Evaluate | None = None) -> dict:
    """Train for ``cfg.rl.steps`` steps, or until the next step would need a rollout batch beyond
    ``rl.budget.samples``; returns a summary. ``evaluate(model, tokenizer, prefix) -> dict`` runs the
    ``rl.eval`` benchmarks at each evaluation (the CLI passes ``eval.runner.rl_evaluator(cfg)``)."""
    if cfg.rl.eval and evaluate is None:
        raise ConfigError("rl.eval is set but run_rl got no evaluate callable; run through `vp2o train` or "
                          "pass evaluate=megatron_vp2o.eval.runner.rl_evaluator(cfg)")
    sess = build_session(cfg, Path(out_dir), resume, evaluate=evaluate)
    state = sess.restore_loop_state(LoopState())
    t_start, elapsed0 = time.perf_counter(), state.elapsed_s
    first_eval = sess.evaluate("eval") if state.step == 0 else {}
    if first_eval:
        sess.logger.log(0, first_eval | {"rollout/samples": 0, "rollout/tokens": 0, "timing/elapsed_s": 0.0})
    metrics, done, reward = {}, budget_spent(cfg, state) and state.next_refresh is not None, float("nan")
    stopper = StopOnSignal()  # SIGURG/SIGTERM/SIGUSR1: checkpoint at the end of the step, leave the loop
    while state.step < cfg.rl.steps and not done and not stopper.stopped:
        state.step += 1
        t0, samples_before = time.perf_counter(), state.samples
        metrics = rl_step(sess, state)
        metrics["timing/step"] = time.perf_counter() - t0
        state.elapsed_s = elapsed0 + time.perf_counter() - t_start
        metrics["timing/elapsed_s"] = state.elapsed_s
        done = budget_spent(cfg, state) and state.next_refresh is not None
        last = done or state.step == cfg.rl.steps
        if last or _eval_due(cfg, state, samples_before):
            metrics |= sess.evaluate("eval")
        sess.logger.log(state.step, metrics | ({"budget_end": True} if done else {}))
        sess.track(metrics)
        reward = metrics.get("reward/mean", reward)  # steps on a kept buffer generate no reward
        sess.progress.update(f"reward {reward:.3f}")
        periodic = cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0
        if periodic or (cfg.checkpoint.save_final and last):
            sess.save(state)
        stopper.after_step(sess, state, saved=bool(periodic or (cfg.checkpoint.save_final and last)))
    sess.close()
    return sess.summary(first_eval, metrics, state, time.perf_counter() - t_start)

"""The GRPO baseline's learner: clipped policy-gradient optimizer steps on the rollout buffer.

``rl.grpo.epochs`` passes of ``rl.grpo.mini_batches`` optimizer steps over the buffer (whole prompt
groups per mini-batch, buffer order; the loss normalised per mini-batch; ``rl.learner.epochs``), as
verl/TRL/NeMo-RL run GRPO, each through the generic ``training.step.train_step`` with the policy loss
of ``rl.learner.forward`` (``grpo_clip`` with ``rl.grpo.clip_eps``). A non-finite loss or gradient
skips that optimizer step only (``grads_finite``); the update counts as skipped when every step was.
GRPO has no anchor budget: its outcome's decision is ACCEPT. ``policy/ratio_{p50,p99,max}``: the
per-token pi/mu over every optimizer step's response tokens (``forward.ratio_stats``).
"""

from __future__ import annotations

import math

from megatron_vp2o.rl.learner.epochs import applied, epoch_steps, mean_of, skip_summary
from megatron_vp2o.rl.learner.forward import grads_finite, ratio_stats, recording_ratios
from megatron_vp2o.rl.learner.outcome import StepOutcome
from megatron_vp2o.rl.learner.vp2o_report import to_host
from megatron_vp2o.training.step import train_step

_AVERAGED = ("clip_frac", "ratio_mean", "kl_ref")  # report entries of the policy loss, averaged over steps


class GRPOLearner:
    """``Learner`` for ``rl.algo=grpo`` (and VP2O with ``vp2o.enabled=false``: plain megatron steps in
    ``rl.vp2o``'s loop)."""

    def __init__(self, trainable, rl_cfg, forward_step):
        self.trainable, self.rl_cfg, self.forward_step = trainable, rl_cfg, forward_step

    def anchors(self, batches: list) -> None:
        return None

    def step(self, batches: list, anchors: list | None = None) -> StepOutcome:
        """The mini-batch epochs (module docstring). Logs the averages over the optimizer steps of
        the loss, the clip fraction and the ratio pi/mu, the last step's lr / grad norm / timings,
        and the count of skipped steps."""
        rl = self.rl_cfg

        def step(micro_batches) -> dict:
            return train_step(self.trainable, micro_batches, self.forward_step, guard=grads_finite,
                              report_keys=_AVERAGED)

        with recording_ratios(self.trainable.models) as ratios:  # policy/ratio_*: every optimizer step's tokens
            outs = epoch_steps(step, batches, rl.loop, rl.policy_loss.group_size)
        done = applied(outs)
        out = mean_of(done, ("loss", *_AVERAGED))
        out |= {k: v for k, v in done[-1].items() if k.startswith("timing/") or k in ("lr", "grad_norm")}
        out |= {"grpo/clip_fraction": out.pop("clip_frac", math.nan),
                "grpo/ratio_mean": out.pop("ratio_mean", math.nan)}
        summary = skip_summary(outs)
        out |= {"grpo/optimizer_steps": summary.pop("optimizer_steps"),
                "grpo/skipped_minibatches": summary.pop("skipped_minibatches")} | summary
        out |= to_host(ratio_stats(ratios))  # one host read of the three ratio statistics
        return StepOutcome.from_metrics(out, "learner")

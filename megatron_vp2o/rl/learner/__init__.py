"""The RL learner in one home: GRPO's and VP2O's learner steps behind one interface.

- ``outcome``: the interface, ``Learner.step(batches, anchors) -> StepOutcome``, and the outcome the
  RL loop acts on and logs (method §2.10-2.13);
- ``grpo``: ``GRPOLearner``, the baseline's clipped mini-batch epochs;
- ``vp2o``: ``VP2OLearner`` and its step ``vp2o_train_step`` (Stein transport, specialisation
  losses, anchor trust region), with its metrics in ``vp2o_report``;
- ``forward``: what both share (policy-loss forward step, behaviour statistics, non-finite guard).

``training/`` keeps SFT and the generic optimizer step that the GRPO learner runs.
"""

from megatron_vp2o.rl.learner.forward import behaviour_stats, grads_finite, policy_forward_step, unwrap
from megatron_vp2o.rl.learner.grpo import GRPOLearner
from megatron_vp2o.rl.learner.outcome import Learner, StepOutcome
from megatron_vp2o.rl.learner.vp2o import VP2OLearner, VP2OState, capture_anchors, init_vp2o, vp2o_train_step

__all__ = ["GRPOLearner", "Learner", "StepOutcome", "VP2OLearner", "VP2OState", "behaviour_stats",
           "capture_anchors", "grads_finite", "init_vp2o", "policy_forward_step", "unwrap", "vp2o_train_step"]

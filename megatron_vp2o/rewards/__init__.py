"""Reward functions for RL, by task name, scored in isolated batches.

Importing this package registers the built-in tasks: math (math-verify), code (sandboxed tests),
ifeval (verifiable instructions), multiple_choice (answer letters), reasoning_gym (reasoning-gym's
scorers), digit_sum and digit_product (the tiny built-in tasks). A learned reward joins with
`RewardModel(...).register("reward_model")`. The optional libraries (math-verify, reasoning-gym,
transformers) are imported on first use only.
"""

from megatron_vp2o.rewards import code_tests, digit_product, digit_sum, ifeval, math_verify_reward
from megatron_vp2o.rewards import multiple_choice
from megatron_vp2o.rewards import reasoning_gym_task
from megatron_vp2o.rewards.registry import (BatchScores, RewardResult, RewardSpec, available,
                                               canonical_answer, get, register, score_batch,
                                               unregister)
from megatron_vp2o.rewards.reward_model import RewardModel

__all__ = ["BatchScores", "RewardModel", "RewardResult", "RewardSpec", "available",
           "canonical_answer", "get", "register", "score_batch", "unregister", "code_tests",
           "digit_product", "digit_sum", "ifeval", "math_verify_reward", "multiple_choice",
           "reasoning_gym_task"]

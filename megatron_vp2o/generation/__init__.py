"""Rollout generation: sampling config, the Rollouts record, the engine interface and the megatron engine."""

from megatron_vp2o.generation.rollouts import Rollouts, RolloutEngine, TeacherForcedBatch, left_pad
from megatron_vp2o.generation.sampling import SamplingConfig, sample, sampling_logprobs, token_logprobs

__all__ = ["Rollouts", "RolloutEngine", "TeacherForcedBatch", "left_pad", "SamplingConfig", "sample",
           "sampling_logprobs", "token_logprobs", "MegatronEngine", "teacher_forced_logprobs"]


def __getattr__(name):  # the megatron engine imports megatron-core (5-8 s): load it on first use
    if name in ("MegatronEngine", "teacher_forced_logprobs", "TeacherForced"):
        from megatron_vp2o.generation import megatron_engine

        return getattr(megatron_engine, name)
    raise AttributeError(name)

"""megatron-core's memory levers in our config (issue 19): ``train.optimizer_cpu_offload``,
``optimizer_offload_fraction`` and the precision-aware optimizer (bf16 moments / main params) map
onto megatron's OptimizerConfig; where megatron refuses (no distributed optimizer, no Transformer
Engine, no CUDA), the build fails with a config error naming the setting to change."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_vp2o.config import Config, ConfigError, build


def _cfg(**train):
    return build(Config, {"train": train})


def test_defaults_add_nothing():
    from megatron_vp2o.training.setup import memory_levers

    assert memory_levers(_cfg()) == {}


def test_low_precision_moments_need_the_precision_aware_optimizer():
    with pytest.raises(ConfigError, match="train.exp_avg_dtype"):
        _cfg(exp_avg_dtype="bf16")


def test_levers_need_the_distributed_optimizer():
    from megatron_vp2o.training.setup import memory_levers

    cfg = build(Config, {"train": {"optimizer_cpu_offload": True}, "parallel": {"distributed_optimizer": False}})
    with pytest.raises(ConfigError, match="parallel.distributed_optimizer=true"):
        memory_levers(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_cpu_offload_without_cuda_names_the_fix():
    from megatron_vp2o.training.setup import memory_levers

    with pytest.raises(ConfigError, match="train.optimizer_cpu_offload=false"):
        memory_levers(_cfg(optimizer_cpu_offload=True, optimizer_offload_fraction=0.5))


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="the no-TE refusal")
def test_precision_aware_without_te_names_the_fix():
    from megatron_vp2o.training.setup import memory_levers

    with pytest.raises(ConfigError, match="transformer_engine"):
        memory_levers(_cfg(use_precision_aware_optimizer=True, exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron's host Adam needs CUDA")
def test_cpu_offload_maps_to_megatron():
    from megatron_vp2o.training.setup import memory_levers

    got = memory_levers(_cfg(optimizer_cpu_offload=True, optimizer_offload_fraction=0.5))
    assert got["optimizer_cpu_offload"] and got["optimizer_offload_fraction"] == 0.5

"""Contract: without CUDA, a model whose head width vLLM's CPU attention does not take is refused by the
pre-flight (``check_vllm``) with one line naming the widths and the fields, before vLLM or megatron-core
start; widths it takes pass that check; with CUDA the check does not apply. Runs without vLLM: the head
width is judged after vLLM's presence, so a fake spec stands in for it."""

import dataclasses
import importlib.util

import pytest
import torch

from megatron_vp2o.cli.checks import VLLM_CPU_HEAD_SIZES, check_vllm
from megatron_vp2o.config import ConfigError, load_config


@pytest.fixture
def cfg(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return load_config("examples/configs/tiny_cpu.yaml", ["rl.engine=vllm"])


def _with_head_dim(cfg, head_dim):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head_dim=head_dim))


def test_cpu_attention_widths_pass(cfg):
    assert cfg.model.hidden_size // cfg.model.num_attention_heads == 32 and 32 in VLLM_CPU_HEAD_SIZES
    check_vllm(cfg, "rl.engine=vllm", "set rl.engine=megatron", world=1)
    check_vllm(_with_head_dim(cfg, 64), "rl.engine=vllm", "set rl.engine=megatron", world=1)


def test_other_width_is_refused_in_one_line(cfg):
    with pytest.raises(ConfigError) as err:
        check_vllm(_with_head_dim(cfg, 16), "rl.engine=vllm", "set rl.engine=megatron", world=1)
    msg = str(err.value)
    assert "\n" not in msg and "this model's is 16" in msg and "model.head_dim" in msg, msg
    assert msg.endswith("run it on a GPU, or set rl.engine=megatron"), msg


def test_gpu_takes_any_width(cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_vllm(_with_head_dim(cfg, 16), "rl.engine=vllm", "set rl.engine=megatron", world=1)

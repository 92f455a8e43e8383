"""Start torch.distributed and megatron-core's parallel state for a config.

Works the same under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from the environment)
and as a plain single process (a 1-rank world on a free loopback port). The platform is activated
first, so on a machine without CUDA the world uses gloo and the CPU layer.
"""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from megatron_vp2o import platform
from megatron_vp2o.config import Layout, ParallelConfig, check_layout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(timeout_s: int = 300) -> None:
    """Create the default process group (no-op if it exists)."""
    plat = platform.activate()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # single process
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(plat.backend, timeout=datetime.timedelta(seconds=timeout_s))


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's RNG tracker (per pipeline stage, like megatron)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_parallel(cfg, seed: int | None = None, sft_batch: bool = True) -> Layout:
    """Validate the layout (``sft_batch``: see ``check_layout``), start the process group and megatron's
    parallel state; returns sizes."""
    from megatron.core import parallel_state

    layout = check_layout(cfg, world_size_from_env(), sft_batch)
    init_process_group()
    par: ParallelConfig = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
            context_parallel_size=par.cp, expert_model_parallel_size=par.ep,
            expert_tensor_parallel_size=par.expert_tp,
        )
    seed_everything(cfg.train.seed if seed is None else seed)
    return layout


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

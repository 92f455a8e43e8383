"""Platform selection: CUDA + NCCL when a GPU is present, CPU + gloo (with :mod:`.cpu`) otherwise.

Call :func:`activate` once at start-up (the CLI and the test harness do). With CUDA present it
changes nothing; without it, it installs the redirects listed in :mod:`megatron_vp2o.platform.cpu`.
Set ``VP2O_FORCE_CPU=1`` to use the CPU path on a machine that has a GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Platform:
    device: torch.device  # where parameters and activations live
    backend: str  # torch.distributed backend
    cpu_layer: bool  # whether the CPU compatibility layer is installed


_active: Platform | None = None


def cuda_usable() -> bool:
    return torch.cuda.is_available() and os.environ.get("VP2O_FORCE_CPU", "0") != "1"


def activate() -> Platform:
    """Pick the platform once; install the CPU layer when CUDA is absent. Idempotent."""
    global _active
    if _active is not None:
        return _active
    if cuda_usable():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        _active = Platform(torch.device("cuda", local_rank), "nccl", cpu_layer=False)
    else:
        from megatron_vp2o.platform import cpu

        cpu.install()
        _active = Platform(torch.device("cpu"), "gloo", cpu_layer=True)
    return _active


def active() -> Platform | None:
    """The active platform, or None before :func:`activate`."""
    return _active


def current() -> Platform:
    """The active platform; raises if :func:`activate` was not called."""
    if _active is None:
        raise RuntimeError("megatron_vp2o.platform.activate() must be called once at start-up")
    return _active


def native():
    """Context for VP2O's own tensor work (the Stein hook, snapshots, prototype refresh, trust region):
    suspends the CPU layer's device-rewriting ``TorchFunctionMode`` (redirect 4), which none of that
    code needs and which costs a Python call per op. A no-op with CUDA (no mode is installed)."""
    if _active is None or not _active.cpu_layer:
        return contextlib.nullcontext()
    return torch._C.DisableTorchFunction()

"""The one device helper: where the project's tensors live.

``device()`` is the model's device: ``cuda:LOCAL_RANK`` when CUDA is usable (the platform picked it
at start-up), else the CPU. Every tensor the project creates outside ``algo/`` either states
``device=device()`` (or the device of a tensor it already has: ``x.device``, ``*_like``,
``x.new_*``), or is host-side bookkeeping and says ``device="cpu"`` explicitly;
``tests/algo/test_device_boundary.py`` checks every factory call for it. ``algo/`` functions take
their device from their inputs.
"""

from __future__ import annotations

import torch


def device() -> torch.device:
    """The model's device: the active platform's, or (before ``platform.activate()``) CUDA's current
    device when CUDA is usable, else the CPU."""
    from megatron_vp2o import platform

    if platform.active() is not None:
        return platform.active().device
    if platform.cuda_usable():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
    """``tensor`` on :func:`device` (a no-op when it is there already)."""
    return tensor.to(device(), non_blocking=non_blocking and tensor.device.type == "cpu")

"""Scalars for the pure functions: a count or normalizer given as a 0-dim tensor or a number.

What: the token counts and normalizers of method §2.2, 2.5 and 2.9 (and the budgets of §2.12)
arrive either as device tensors (global counts after a reduction) or as Python numbers (a static
count, a test's input). A number turned into a device tensor with ``torch.tensor`` or
``torch.as_tensor(..., device=...)`` is a host-to-device copy, which CUDA-graph capture refuses (and
an extra copy per call outside it); ``torch.full`` is a fill kernel on the device. Every algo
function that accepts "tensor or number" goes through ``as_scalar``; tests/algo/test_boundary.py
forbids the copying spellings in this package.

Shape legend: 0-dim results only.
"""

from __future__ import annotations

import torch


def as_scalar(value: torch.Tensor | float | int | bool, like: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a 0-dim tensor on ``like``'s device, of ``dtype`` (default: ``like``'s).

    A tensor is cast and moved (a no-op when it already matches); a number is filled on the
    device, never copied from the host."""
    dtype = like.dtype if dtype is None else dtype
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=dtype)
    return torch.full((), value, dtype=dtype, device=like.device)

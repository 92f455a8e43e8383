"""Model inputs shared by training and checkpoint conversion: the causal mask and position ids of a
plain (unpadded) forward of megatron's GPTModel.

Here, not in ``training/``, so that conversion's ``--verify`` (``checkpoint/convert_hf.py``) does
not import the training package (tests/algo/test_boundary.py checks that direction).

Shape legend: B sequences, S columns.
"""

from __future__ import annotations

import torch

from megatron_vp2o.device import device as model_device


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Bool [1, 1, S, S], True = masked (explicit, so no CUDA factory runs in autograd threads);
    on ``device`` (default: the model's, :func:`megatron_vp2o.device.device`)."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device or model_device()).triu(1)


def position_ids(batch: int, seq_len: int, device=None) -> torch.Tensor:
    """Long [B, S]: 0 .. S-1 for every sequence."""
    return torch.arange(seq_len, device=device or model_device()).unsqueeze(0).expand(batch, -1)

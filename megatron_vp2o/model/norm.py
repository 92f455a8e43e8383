"""RMSNorm that works with tensor + sequence parallelism without Transformer Engine or apex.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel=True`` (it cannot mark its
weight), and MoE with TP > 1 requires sequence parallelism. Under SP each TP rank normalises its
own slice of the sequence with a *replicated* weight, so the weight's gradient is a partial sum:
marking it ``sequence_parallel=True`` makes megatron's ``finalize_model_grads`` all-reduce it over
the TP group, exactly as it does for TE's norms. Query/key norms act on heads after the sequence
gather, so :class:`QKRMSNorm` is never marked.

y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 and cast back (as TE and HF do).
"""

from __future__ import annotations

import torch

from megatron_vp2o.device import device


def _init_device(config) -> torch.device:
    """Where megatron would create the weight: the CPU under ``use_cpu_initialization``, else the device."""
    return torch.device("cpu") if getattr(config, "use_cpu_initialization", False) else device()


class RMSNorm(torch.nn.Module):
    """Layer/final norm; ``config`` is megatron's TransformerConfig (spec-compatible signature)."""

    mark_sequence_parallel = True

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=_init_device(config)))
        sp = bool(getattr(config, "sequence_parallel", False)) and self.mark_sequence_parallel
        setattr(self.weight, "sequence_parallel", sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class QKRMSNorm(RMSNorm):
    """Per-head query/key norm (Qwen3): not sequence-parallel."""

    mark_sequence_parallel = False

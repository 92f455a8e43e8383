"""One optimizer step of the language-model loss through megatron's pipeline schedules.

``forward_step`` feeds one micro-batch and returns megatron's per-token loss tensor with a
``loss_func`` that returns ``(sum of masked token losses, token count, report)``;
``train_step`` runs ``get_forward_backward_func()`` over the micro-batches, then the optimizer
step and the LR schedule, and reports the global mean loss (identical on every rank).
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vp2o.device import device as model_device_default
from megatron_vp2o.model.inputs import causal_mask, position_ids  # noqa: F401  (also imported from here)


def lm_loss_func(loss_mask_BS: torch.Tensor, output_BS: torch.Tensor):
    """Sum of masked token losses, the token count, and a ``[sum, count]`` report (megatron's 3-tuple)."""
    loss_sum = (output_BS.float().reshape(-1) * loss_mask_BS.reshape(-1)).sum()
    num_tokens = loss_mask_BS.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def lm_forward_step(data_iterator, model, device=None):
    batch = next(data_iterator)
    tokens = batch.tokens.to(device or model_device(model))
    b, s = tokens.shape
    out = model(tokens, position_ids(b, s, tokens.device), causal_mask(s, tokens.device),
                labels=batch.labels.to(tokens.device))
    return out, partial(lm_loss_func, batch.loss_mask.to(tokens.device))


def reduce_report(losses_reduced: list[dict], key: str = "lm loss") -> torch.Tensor:
    """Global ``[sum, count]`` of ``key`` over micro-batches and DP ranks, the same on every rank.

    Only the last pipeline stage holds losses; TP/CP replicas hold copies, so only the
    (tp=0, cp=0) rank of the last stage contributes before the world all-reduce.
    """
    total = torch.zeros(2, dtype=torch.float64, device=model_device_default())
    contributes = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
                   and ps.get_context_parallel_rank() == 0)
    if contributes:
        for item in losses_reduced:
            total += item[key].detach().double().to(total.device)
    dist.all_reduce(total)
    return total.cpu()


def train_step(trainable, micro_batches: list, forward_step=lm_forward_step, guard=None,
               report_keys: tuple[str, ...] = ()) -> dict:
    """Forward/backward over ``micro_batches``, optimizer step, LR schedule; returns metrics.

    ``guard(trainable) -> bool`` runs after the backward (gradients reduced); False skips the
    optimizer step and the schedule (the weights do not change) and reports ``skipped``.
    ``report_keys``: other ``[sum, count]`` entries of the loss function's report to average."""
    t0 = time.perf_counter()
    for m in trainable.models:
        m.zero_grad_buffer()
    trainable.optimizer.zero_grad()
    mb = micro_batches[0]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=trainable.models,
        num_microbatches=len(micro_batches), seq_length=mb.tokens.shape[1],
        micro_batch_size=mb.tokens.shape[0], forward_only=False,
    )
    t1 = time.perf_counter()
    loss_sum, count = reduce_report(losses).tolist()
    extra = {}
    for key in report_keys:
        total, n = reduce_report(losses, key).tolist()
        extra[key] = total / max(n, 1.0)
    if guard is not None and not guard(trainable):
        trainable.optimizer.zero_grad()
        return {"loss": loss_sum / max(count, 1.0), "skipped": True, "skip_reason": "non-finite loss or gradient",
                "timing/forward_backward": t1 - t0}
    ok, grad_norm, _ = trainable.optimizer.step()
    trainable.scheduler.step(increment=1)
    t2 = time.perf_counter()
    return {
        "loss": loss_sum / max(count, 1.0), "tokens": int(count),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": trainable.optimizer.param_groups[0]["lr"], "update_ok": bool(ok),
        "timing/forward_backward": t1 - t0, "timing/optimizer": t2 - t1, **extra,
    }

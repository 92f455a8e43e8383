"""Build the trainable stack: megatron GPTModel -> DistributedDataParallel -> optimizer -> schedule.

Everything here is megatron-core's own machinery: ``DistributedDataParallel`` (gradient buckets,
all-reduce or reduce-scatter with the distributed optimizer), ``get_megatron_optimizer`` (AdamW;
the torch fallback when TE/apex are absent), ``OptimizerParamScheduler`` (warm-up + cosine) and
``finalize_model_grads`` (DP/EP/PP/SP gradient reductions and the per-token loss scaling).

Loss normalisation: ``calculate_per_token_loss=True`` -- each micro-batch returns the *sum* of
its token losses and its token count; megatron sums both over micro-batches and data-parallel
ranks and divides the gradients once by the global token count (STYLE principle 9).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_vp2o.model import build_gpt, transformer_config


@dataclass
class Trainable:
    config: object  # megatron TransformerConfig
    model: DistributedDataParallel  # this pipeline stage, wrapped
    optimizer: object  # megatron optimizer (DistributedOptimizer / Float16 / FP32, maybe chained)
    scheduler: OptimizerParamScheduler

    @property
    def models(self) -> list:
        return [self.model]

    @property
    def module(self):
        """The bare GPTModel (for state dicts and hooks)."""
        return self.model.module


def build_trainable(cfg, moe_layer_cls=MoELayer, **transformer_overrides) -> Trainable:
    """Model, DDP, optimizer and LR schedule for ``cfg`` on the already-initialised parallel state."""
    tconf = transformer_config(cfg.model, cfg.parallel, calculate_per_token_loss=True, **transformer_overrides)
    model = build_gpt(cfg.model, tconf, moe_layer_cls=moe_layer_cls)
    par, train = cfg.parallel, cfg.train
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=par.distributed_optimizer,
        overlap_grad_reduce=par.overlap_grad_reduce, bucket_size=None,
    )
    ddp = DistributedDataParallel(tconf, ddp_cfg, model)
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps, clip_grad=train.clip_grad,
        bf16=tconf.bf16, params_dtype=tconf.params_dtype, use_distributed_optimizer=par.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if train.warmup_steps else train.lr, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps, lr_decay_steps=max(train.steps, train.warmup_steps + 1),
        lr_decay_style="cosine", start_wd=train.weight_decay, end_wd=train.weight_decay,
        wd_incr_steps=train.steps, wd_incr_style="constant",
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,  # resume: the config wins
    )
    tconf.finalize_model_grads_func = finalize_model_grads
    tconf.grad_scale_func = optimizer.scale_loss
    tconf.no_sync_func = ddp.no_sync
    if par.overlap_grad_reduce:
        tconf.grad_sync_func = ddp.start_grad_sync
    return Trainable(tconf, ddp, optimizer, scheduler)

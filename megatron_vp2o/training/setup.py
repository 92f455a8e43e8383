"""Build the trainable stack: megatron GPTModel -> DistributedDataParallel -> optimizer -> schedule.

Everything here is megatron-core's own machinery: ``DistributedDataParallel`` (gradient buckets,
all-reduce or reduce-scatter with the distributed optimizer), ``get_megatron_optimizer`` (AdamW;
the torch fallback when TE/apex are absent), ``OptimizerParamScheduler`` (warm-up + cosine) and
``finalize_model_grads`` (DP/EP/PP/SP gradient reductions and the per-token loss scaling).

Loss normalisation: ``calculate_per_token_loss=True`` -- each micro-batch returns the *sum* of
its token losses and its token count; megatron sums both over micro-batches and data-parallel
ranks and divides the gradients once by the global token count (CONTRIBUTING.md §9).
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


def memory_levers(cfg) -> dict:
    """megatron-core's optimizer memory levers from ``train`` (CPU offload of Adam, precision-aware
    optimizer with bf16 moments / main params). megatron's own rules, checked here so that a run
    fails at build time with the setting to change: both need the distributed optimizer; the
    precision-aware optimizer needs Transformer Engine's FusedAdam unless Adam runs on the host."""
    import importlib.util

    import torch

    from megatron_vp2o.config import ConfigError

    train, par = cfg.train, cfg.parallel
    if not (train.optimizer_cpu_offload or train.use_precision_aware_optimizer):
        return {}
    if not par.distributed_optimizer:
        raise ConfigError("train.optimizer_cpu_offload / train.use_precision_aware_optimizer need "
                          "parallel.distributed_optimizer=true (megatron-core)")
    if train.use_precision_aware_optimizer and importlib.util.find_spec("transformer_engine") is None:
        # megatron-core checks the Transformer Engine version in OptimizerConfig (a TypeError without it)
        raise ConfigError("train.use_precision_aware_optimizer needs Transformer Engine (its FusedAdam keeps the "
                          "bf16 moments / main params; megatron-core checks its version); install "
                          "transformer_engine on the GPU machine, or set train.use_precision_aware_optimizer=false")
    if train.optimizer_cpu_offload and not torch.cuda.is_available():
        # HybridDeviceOptimizer splits device and host parameters; on a CPU-only machine every
        # parameter is already a host tensor and torch refuses its host copies ("non-leaf Tensor")
        raise ConfigError("train.optimizer_cpu_offload moves Adam from the GPU to the host: without CUDA the "
                          "optimizer state is already in host memory; set train.optimizer_cpu_offload=false")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out = {}
    if train.optimizer_cpu_offload:
        out |= dict(optimizer_cpu_offload=True, optimizer_offload_fraction=train.optimizer_offload_fraction,
                    overlap_cpu_optimizer_d2h_h2d=train.overlap_cpu_optimizer_d2h_h2d and torch.cuda.is_available(),
                    pin_cpu_grads=torch.cuda.is_available(), pin_cpu_params=torch.cuda.is_available())
    if train.use_precision_aware_optimizer:
        out |= dict(use_precision_aware_optimizer=True, main_params_dtype=dtypes[train.main_params_dtype],
                    exp_avg_dtype=dtypes[train.exp_avg_dtype], exp_avg_sq_dtype=dtypes[train.exp_avg_sq_dtype])
    return out


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
        **memory_levers(cfg),
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

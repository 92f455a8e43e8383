"""Cross-section config rules: parallel sizes against the world size and the model shape.

:func:`check_layout` runs before any process group, model or file is created, so an impossible
layout fails with a message that names the field and the fix instead of a megatron assert deep in
``initialize_model_parallel``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from megatron_vp2o.config.loader import ConfigError


@dataclass(frozen=True)
class Layout:
    """Derived parallel sizes."""

    world: int
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    dp: int  # data-parallel size of the dense part
    edp: int  # data-parallel size of the experts
    sequence_parallel: bool
    num_micro_batches: int


def recompute_modules(model) -> list[str]:
    """The selective-recompute modules of ``model.recompute: selective``, refused (one line naming
    ``model.recompute_modules``) where one needs Transformer Engine and it is not installed. Called by
    the CLI pre-flight and when the megatron config is built."""
    from megatron_vp2o.config.schema import SELECTIVE_MODULES, TE_RECOMPUTE_MODULES

    modules = list(model.recompute_modules) if model.recompute_modules is not None else list(SELECTIVE_MODULES)
    te = [m for m in modules if m in TE_RECOMPUTE_MODULES]
    if model.recompute == "selective" and te and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(f"model.recompute_modules: {', '.join(te)} need Transformer Engine (megatron-core's "
                          "CheckpointWithoutOutput); install it (GPU) or recompute core_attn and moe")
    return modules


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_layout(cfg, world_size: int, sft_batch: bool = True) -> Layout:
    """Validate ``cfg.parallel`` / ``cfg.model`` / ``cfg.train`` for ``world_size`` ranks. ``sft_batch``:
    also ``train.global_batch_size`` against micro-batch x data-parallel size, which only supervised
    training (``vp2o sft``) reads; RL and evaluation pass False (their batches are ``rl.*``)."""
    par, model, train = cfg.parallel, cfg.model, cfg.train
    tp, pp, ep, cp, etp = par.tp, par.pp, par.ep, par.cp, par.expert_tp
    _need(model.num_experts % ep == 0,
          f"model.num_experts={model.num_experts} is not divisible by parallel.ep={ep}; "
          f"choose parallel.ep among {[d for d in range(1, model.num_experts + 1) if model.num_experts % d == 0]}")
    _need(world_size % (tp * pp * cp) == 0,
          f"world size {world_size} is not divisible by parallel.tp x parallel.pp x parallel.cp = {tp * pp * cp}; "
          f"launch a multiple of {tp * pp * cp} ranks or change the parallel sizes")
    _need(world_size % (etp * ep * pp) == 0,
          f"world size {world_size} is not divisible by parallel.etp x parallel.ep x parallel.pp = {etp * ep * pp}; "
          "change parallel.ep or parallel.etp")
    _need(model.num_layers % pp == 0,
          f"model.num_layers={model.num_layers} is not divisible by parallel.pp={pp}")
    _need(model.num_attention_heads % tp == 0 and model.num_query_groups % tp == 0,
          f"model.num_attention_heads={model.num_attention_heads} and model.num_query_groups="
          f"{model.num_query_groups} must both be divisible by parallel.tp={tp}")
    _need(model.moe_ffn_hidden_size % etp == 0,
          f"model.moe_ffn_hidden_size={model.moe_ffn_hidden_size} is not divisible by the expert TP size {etp}")
    sp = par.use_sequence_parallel
    _need(tp == 1 or sp, "parallel.sequence_parallel must be true when parallel.tp > 1 with MoE layers "
          "(megatron-core requires it); remove the override or set it to true")
    dp = world_size // (tp * pp * cp)
    edp = world_size // (etp * ep * pp)
    per_step = train.micro_batch_size * dp
    _need(not sft_batch or train.global_batch_size % per_step == 0,
          f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size x "
          f"data-parallel size = {train.micro_batch_size} x {dp} = {per_step}")
    _need(model.seq_length % (tp * cp * 2 if cp > 1 else tp) == 0,
          f"model.seq_length={model.seq_length} must be divisible by parallel.tp (x 2 x cp with context parallel)")
    return Layout(world_size, tp, pp, ep, etp, cp, dp, edp, sp, max(1, train.global_batch_size // per_step))

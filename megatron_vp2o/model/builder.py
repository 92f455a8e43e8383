"""Build megatron-core's ``GPTModel`` with MoE layers from a typed :class:`ModelConfig`.

:func:`transformer_config` maps our config onto megatron-core's ``TransformerConfig`` (one place,
so conversion and training agree on every flag); :func:`build_gpt` builds the pipeline stage of the
calling rank. The router mapping (megatron flag <- ours):

* ``moe_router_score_function`` <- ``router.score_function``
* ``moe_router_pre_softmax`` <- ``not router.topk_normalize`` (softmax: top-k of the logits then
  softmax = renormalised top-k gates, as Mixtral and Qwen3 with ``norm_topk_prob=True``)
* ``moe_router_load_balancing_type`` / ``moe_aux_loss_coeff`` <- ``router.aux_loss_type/coeff``
* ``moe_router_dtype`` <- ``router.dtype``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vp2o import compat
from megatron_vp2o.device import device
from megatron_vp2o.config import ConfigError, ModelConfig, ParallelConfig
from megatron_vp2o.config.validate import recompute_modules
from megatron_vp2o.model.spec import decoder_block_spec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 8) -> int:
    """Round the vocabulary up to a multiple of ``multiple * tp`` (megatron's vocab padding)."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def transformer_config(model: ModelConfig, parallel: ParallelConfig, use_cpu_init: bool | None = None,
                       **extra) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` for ``model`` under ``parallel``."""
    router = model.router
    if router.score_function == "sigmoid" and not router.topk_normalize and model.moe_router_topk > 1:
        raise ConfigError("model.router.topk_normalize=false is only supported with score_function=softmax")
    dtype = _DTYPES[model.params_dtype]
    if use_cpu_init is None:
        use_cpu_init = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        kv_channels=model.resolved_head_dim,
        ffn_hidden_size=model.ffn_hidden_size, normalization="RMSNorm", layernorm_epsilon=model.norm_eps,
        gated_linear_unit=model.swiglu, activation_func=F.silu, add_bias_linear=False,
        qk_layernorm=model.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=model.init_method_std,
        num_moe_experts=model.num_experts, moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size, moe_layer_freq=model.moe_layer_freq,
        moe_shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size or None,
        moe_router_score_function=router.score_function, moe_router_pre_softmax=not router.topk_normalize,
        moe_router_load_balancing_type=router.aux_loss_type if router.aux_loss_type != "none" else "none",
        moe_aux_loss_coeff=router.aux_loss_coeff if router.aux_loss_type != "none" else 0.0,
        moe_router_dtype=router.dtype, moe_token_dispatcher_type=model.dispatcher,
        **compat.grouped_gemm_kwargs(model.expert_impl),
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=parallel.expert_tp,
        context_parallel_size=parallel.cp, sequence_parallel=parallel.use_sequence_parallel,
        pipeline_dtype=dtype if parallel.pp > 1 else None,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=use_cpu_init,
    )
    kwargs.update(recompute_kwargs(model))
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def recompute_kwargs(model: ModelConfig) -> dict:
    """megatron-core's activation-recompute arguments for ``model.recompute`` (none | selective |
    full); megatron's own mechanism (``tensor_parallel.checkpoint``), VP2O layers recompute exactly
    (moe/layer.py: statistics once per micro-batch, the recompute replays the first forward's mask)."""
    if model.recompute == "none":
        return {}
    if model.recompute == "full":
        return dict(recompute_granularity="full", recompute_method=model.recompute_method,
                    recompute_num_layers=model.recompute_num_layers)
    modules = recompute_modules(model)
    return dict(recompute_granularity="selective", recompute_modules=modules)


def build_gpt(model: ModelConfig, config: TransformerConfig, moe_layer_cls=MoELayer, backend: str | None = None,
              pre_process: bool | None = None, post_process: bool | None = None) -> GPTModel:
    """This rank's pipeline stage of the MoE GPT (megatron-core ``GPTModel``)."""
    if backend is None:
        backend = "te" if model.expert_impl == "te_grouped" else "local"
    if model.expert_impl == "te_grouped" and backend != "te":
        raise ConfigError("model.expert_impl=te_grouped needs the 'te' backend (Transformer Engine on a GPU)")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    core_attention = None
    if model.attention == "sdpa" and backend == "local":
        from megatron_vp2o.model.attention import SDPAttention

        core_attention = SDPAttention
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, backend, moe_layer_cls, core_attention=core_attention),
        vocab_size=padded_vocab_size(model.vocab_size, tp),
        max_sequence_length=model.seq_length,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=not model.untie_embeddings,
        position_embedding_type="rope", rotary_base=model.rotary_base,
    )
    # parameters and buffers on the model's device, as megatron's get_model does with .cuda()
    # (under use_cpu_initialization they are created on the CPU; a no-op on a CPU-only machine);
    # a model built under ``torch.device("meta")`` stays there (plan/meta.py counts its parameters)
    return gpt if any(p.is_meta for p in gpt.parameters()) else gpt.to(device())

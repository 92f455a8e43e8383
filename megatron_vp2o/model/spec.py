"""Layer specs: megatron-core's GPT decoder specs with our norm and a pluggable MoE layer class.

We start from ``get_gpt_decoder_block_spec`` (which handles ``moe_layer_freq`` and the pipeline
stage's slice of layers) and change only two things, through docs/method.md (never by editing
megatron-core):

* ``local`` backend: optionally torch SDPA as core attention (``model.attention: sdpa``,
  :mod:`megatron_vp2o.model.attention`); the layer/final norms become :class:`~megatron_vp2o.model.norm.RMSNorm`
  (sequence-parallel capable) and q/k norms :class:`~megatron_vp2o.model.norm.QKRMSNorm`;
  ``te`` backend (GPU with Transformer Engine): TE's own norms and linears are kept.
* the MoE module class is ``moe_layer_cls`` (megatron's ``MoELayer`` or the VP2O subclass).
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_vp2o import compat
from megatron_vp2o.model.norm import QKRMSNorm, RMSNorm


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _swap_moe(mlp_spec, moe_layer_cls):
    """The layer's MoE entry building ``moe_layer_cls`` and, when the class names one
    (``router_cls``, e.g. VP2O's), its router class; both spec forms (compat row 1)."""
    return compat.swap_moe_layer(mlp_spec, moe_layer_cls, getattr(moe_layer_cls, "router_cls", None))


def moe_layer_classes(block: TransformerBlockSubmodules) -> list:
    """The MoE layer class of each layer spec of ``block`` (None for dense layers)."""
    return [compat.moe_layer_class(s.submodules.mlp) for s in block.layer_specs]


def _local_layer(layer_spec: ModuleSpec, moe_layer_cls, core_attention=None) -> ModuleSpec:
    sub = copy.copy(layer_spec.submodules)
    attn_sub = copy.copy(sub.self_attention.submodules)
    if core_attention is not None:
        attn_sub.core_attention = core_attention
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attn_sub, name, IdentityOp) is not IdentityOp:
            setattr(attn_sub, name, QKRMSNorm)
    attn = dataclasses.replace(sub.self_attention, submodules=attn_sub)
    sub = dataclasses.replace(sub, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm,
                              self_attention=attn, mlp=_swap_moe(sub.mlp, moe_layer_cls))
    return dataclasses.replace(layer_spec, submodules=sub)


def _te_layer(layer_spec: ModuleSpec, moe_layer_cls) -> ModuleSpec:
    sub = dataclasses.replace(layer_spec.submodules, mlp=_swap_moe(layer_spec.submodules.mlp, moe_layer_cls))
    return dataclasses.replace(layer_spec, submodules=sub)


def decoder_block_spec(config, backend: str = "local", moe_layer_cls=MoELayer,
                       pp_rank: int | None = None, core_attention=None) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage (``pp_rank=None``: the calling rank's stage).
    ``core_attention``: a local-backend replacement for megatron's DotProductAttention (e.g. SDPA)."""
    if backend not in ("local", "te"):
        raise ValueError(f"backend must be 'local' or 'te' (got {backend!r})")
    if backend == "te" and not te_available():
        raise RuntimeError("backend 'te' needs Transformer Engine (use the NGC PyTorch image) or backend 'local'")
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "te",
                                       normalization="RMSNorm", pp_rank=pp_rank)
    if backend == "te":
        out = TransformerBlockSubmodules(
            layer_specs=[_te_layer(s, moe_layer_cls) for s in block.layer_specs], layer_norm=block.layer_norm)
    else:
        out = TransformerBlockSubmodules(
            layer_specs=[_local_layer(s, moe_layer_cls, core_attention) for s in block.layer_specs],
            layer_norm=RMSNorm)
    expected = sum(1 for c in moe_layer_classes(block) if c is not None)
    got = sum(1 for c in moe_layer_classes(out) if c is not None and issubclass(c, moe_layer_cls))
    if got != expected:  # a new spec form that the swap does not know: fail here, not silently later
        raise RuntimeError(f"megatron-core {compat.MCORE_VERSION}: the MoE layer spec could not be switched to "
                           f"{moe_layer_cls.__name__} ({got} of {expected} layers); see megatron_vp2o/compat.py")
    return out

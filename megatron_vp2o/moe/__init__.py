"""VP2O on megatron-core MoE: the prototype-carrying MoE layer and the expert-layout accessor."""

from megatron_vp2o.moe.experts import ExpertAccessor
from megatron_vp2o.moe.layer import VP2OMoELayer, flush_step_stats, vp2o_layers, vp2o_moe_layer

__all__ = ["ExpertAccessor", "VP2OMoELayer", "flush_step_stats", "vp2o_layers", "vp2o_moe_layer"]

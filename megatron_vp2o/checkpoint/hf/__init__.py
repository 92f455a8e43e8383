"""Hugging Face <-> megatron-core MoE checkpoints: pure key/layout mapping and streaming safetensors IO.

``archs``: supported architectures (Qwen3-MoE, Mixtral), their tensor names and config mapping;
``keys``: layout functions (QKV grouping, gate||up, GroupedMLP packing, vocab padding);
``mapping``: megatron parameter names <-> HF tensors; ``io``: validated lazy reader, sharded writer.
The world-level procedures live in :mod:`megatron_vp2o.checkpoint.convert_hf`.
"""

from megatron_vp2o.checkpoint.hf.archs import ARCHS, ConversionError, hf_config_from_model, model_config_from_hf

__all__ = ["ARCHS", "ConversionError", "hf_config_from_model", "model_config_from_hf"]

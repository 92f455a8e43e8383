"""The MoE GPT on megatron-core: config mapping, layer specs, the sequence-parallel RMSNorm."""

from megatron_vp2o.model.builder import build_gpt, padded_vocab_size, transformer_config

__all__ = ["build_gpt", "padded_vocab_size", "transformer_config"]

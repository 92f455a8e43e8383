"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (``model.attention: sdpa``).

megatron-core's local ``DotProductAttention`` materialises the scores with ``baddbmm``, repeats
K/V for GQA and runs a separate masked softmax; on CPU (and on GPUs without Transformer Engine)
PyTorch's fused SDPA kernel is faster and needs less memory. Same inputs, same outputs:
``[sq, b, np, hn]`` queries, ``[sk, b, ng, hn]`` keys/values, megatron's boolean mask
(True = masked; None with a causal mask type = causal), output ``[sq, b, np * hn]``.
GQA uses SDPA's ``enable_gqa`` (query head h reads kv head h // (np / ng), megatron's grouping).
Masked logits are -inf here and -10000 in megatron's softmax: identical probabilities in fp32
unless a row is fully masked (our callers never build one). Anything this path does not cover
(learnable/off-by-one softmax, sliding windows, attention bias, packed sequences) falls back to
megatron's implementation.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def _drop_mask_cache(ref) -> None:
    if SDPAttention._mask_cache[0] is ref:  # only the entry of the mask that just went
        SDPAttention._mask_cache = (None, None, None)


class SDPAttention(DotProductAttention):
    # The mask of the last forward as SDPA's additive float mask: every layer of a forward gets the
    # same mask object, so it is converted once per forward, not once per layer (SDPA would turn a
    # bool mask into a float one on every call). Keyed by the mask's identity and version; a weak
    # reference, so the converted copy goes when the mask does.
    _mask_cache: tuple = (None, None, None)

    @classmethod
    def _additive(cls, mask, dtype):
        ref, key, converted = cls._mask_cache
        if ref is not None and ref() is mask and key == (mask._version, dtype):
            return converted
        converted = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
        SDPAttention._mask_cache = (weakref.ref(mask, _drop_mask_cache), (mask._version, dtype), converted)
        return converted

    def _supported(self, attention_bias, packed_seq_params) -> bool:
        return (self.config.softmax_type == "vanilla" and self.config.window_size is None
                and attention_bias is None and packed_seq_params is None
                and not self.config.apply_query_key_layer_scaling)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._supported(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q_BHSD, k_BHSD, v_BHSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq = query.shape[0]
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        keep = None if attention_mask is None else self._additive(attention_mask, query.dtype)
        dropout = self.attention_dropout.p if self.training else 0.0
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BHSD, v_BHSD, attn_mask=keep, dropout_p=dropout, is_causal=is_causal,
            scale=self.softmax_scale, enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return out_BHSD.permute(2, 0, 1, 3).reshape(sq, query.shape[1], self.hidden_size_per_partition)

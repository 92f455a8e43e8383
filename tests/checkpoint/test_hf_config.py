"""Contract: every malformed value of an HF ``config.json`` (a required key missing, a value of the wrong
type: strings, booleans, lists, nulls, negative or non-finite numbers) stops ``model_config_from_hf`` with
one ConversionError line naming the key, never a traceback of another kind."""

import math

import pytest

from megatron_vp2o.checkpoint.hf.archs import ConversionError, model_config_from_hf

MIXTRAL = dict(model_type="mixtral", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_experts_per_tok=2, num_local_experts=4, intermediate_size=16,
               max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
               router_aux_loss_coef=0.01, torch_dtype="float32")
QWEN3 = dict(MIXTRAL, model_type="qwen3_moe", num_experts=4, moe_intermediate_size=16, head_dim=16,
             norm_topk_prob=True, num_local_experts=None)
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok")
BAD_VALUES = ("32", True, [32], {"a": 1}, -3, math.nan, 2.5)


@pytest.mark.parametrize("base", [MIXTRAL, QWEN3], ids=["mixtral", "qwen3_moe"])
def test_good_configs_convert(base):
    arch, cfg = model_config_from_hf({k: v for k, v in base.items() if v is not None})
    assert arch.model_type == base["model_type"] and cfg.num_experts == 4 and cfg.hidden_size == 32


@pytest.mark.parametrize("base", [MIXTRAL, QWEN3], ids=["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_key_is_named(base, key):
    hf = {k: v for k, v in base.items() if v is not None and k != key}
    with pytest.raises(ConversionError, match=f"missing key '{key}'") as info:
        model_config_from_hf(hf)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("base", [MIXTRAL, QWEN3], ids=["mixtral", "qwen3_moe"])
def test_every_wrong_typed_value_names_its_key(base):
    good = {k: v for k, v in base.items() if v is not None}
    for key in sorted(set(good) - {"model_type"}):
        for bad in BAD_VALUES:
            hf = dict(good, **{key: bad})
            try:
                model_config_from_hf(hf)
            except ConversionError as exc:
                msg = str(exc)
                assert "\n" not in msg, (key, bad, msg)
                assert key in msg or "unsupported" in msg or "experts" in msg, (key, bad, msg)
            else:  # accepted: only where the value is valid for that key
                assert isinstance(bad, type(good[key])) or (isinstance(good[key], float) and not isinstance(bad, bool)
                                                           and isinstance(bad, (int, float))), (key, bad)

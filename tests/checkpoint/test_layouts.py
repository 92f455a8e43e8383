"""Contract: every HF <-> megatron layout rule and config mapping is exact and rejects what it cannot convert (CPU, pure)."""

import pytest
import torch

from megatron_vp2o.checkpoint.hf import archs, keys, mapping
from megatron_vp2o.config import ModelConfig


def _rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_qkv_groups_rows_per_query_group_with_explicit_head_dim():
    heads, groups, d, h = 8, 2, 6, 20  # head_dim 6 != 20/8
    q, k, v = _rand(heads * d, h), _rand(groups * d, h) + 1, _rand(groups * d, h) + 2
    qkv = keys.fuse_qkv(q, k, v, groups)
    per = heads // groups
    block = (per + 2) * d
    for g in range(groups):  # [q heads of group g; k_g; v_g]
        assert torch.equal(qkv[g * block:g * block + per * d], q[g * per * d:(g + 1) * per * d])
        assert torch.equal(qkv[g * block + per * d:g * block + (per + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(qkv[g * block + (per + 1) * d:(g + 1) * block], v[g * d:(g + 1) * d])
    assert all(torch.equal(a, b) for a, b in zip(keys.split_qkv(qkv, heads, groups, d), (q, k, v)))
    # TP=2 shards whole query groups: rank r's rows are exactly group r
    assert torch.equal(keys.shard(qkv, 0, 1, 2), qkv[block:])


def test_fc1_is_gate_then_up_and_tp_shards_each_half():
    gate, up = _rand(8, 4), _rand(8, 4) + 5
    fc1 = keys.fuse_fc1(gate, up)
    assert torch.equal(fc1[:8], gate) and torch.equal(fc1[8:], up)
    r1 = keys.shard(fc1, 0, 1, 2, glu=True)
    assert torch.equal(r1, torch.cat([gate[4:], up[4:]]))
    with pytest.raises(ValueError, match="does not split"):
        keys.shard(_rand(5, 3), 0, 0, 2)


@pytest.mark.parametrize("etp", [1, 2])
def test_grouped_mlp_packing_matches_megatron_forward_view(etp):
    """GroupedMLP reads weight1.view(El, H, -1)[e] as fc1_e.T: x @ that == x @ fc1_e.T for each expert."""
    el, h, f = 3, 6, 4
    fc1 = [keys.shard(_rand(2 * f, h) + e, 0, etp - 1, etp, glu=True) for e in range(el)]
    fc2 = [keys.shard(_rand(h, f) - e, 1, etp - 1, etp) for e in range(el)]
    w1, w2 = keys.pack_grouped(fc1, fc2)
    assert w1.shape == (h, el * 2 * f // etp) and w2.shape == (el * f // etp, h)
    x = _rand(5, h)
    for e in range(el):
        assert torch.equal(w1.view(el, h, -1)[e], fc1[e].t()) and torch.equal(w2.view(el, -1, h)[e], fc2[e].t())
        assert torch.allclose(x @ w1.view(el, h, -1)[e], x @ fc1[e].t(), atol=1e-5)
    back1, back2 = keys.unpack_grouped(w1, w2, el)
    assert all(torch.equal(a, b) for a, b in zip(back1 + back2, fc1 + fc2))


def test_vocab_padding_is_zero_rows_and_cut_on_export():
    w = _rand(100, 4)
    padded = keys.pad_vocab(w, 104)
    assert padded.shape == (104, 4) and not padded[100:].any()
    assert torch.equal(keys.unpad_vocab(padded, 100), w)


def test_mapping_names_cover_experts_in_every_layout():
    arch = archs.ARCHS["mixtral"]
    sh = mapping.Shards(layer_offset={0: 3}, expert_offset={0: [4, 5]}, etp=(0, 1))
    hf = {arch.hf(p, 3, e): _rand(8, 4) + 10 * e + (p == "up") for e in (4, 5) for p in ("gate", "up")}
    hf.update({arch.hf("down", 3, e): _rand(4, 8) - e for e in (4, 5)})
    fc1 = mapping.mcore_from_hf("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", arch, hf.get, sh)
    assert torch.equal(fc1, torch.cat([hf[arch.hf("gate", 3, 5)], hf[arch.hf("up", 3, 5)]]))
    te = mapping.mcore_from_hf("decoder.layers.0.mlp.experts.linear_fc2.weight1", arch, hf.get, sh)
    assert torch.equal(te, hf[arch.hf("down", 3, 5)])
    w1 = mapping.mcore_from_hf("decoder.layers.0.mlp.experts.weight1", arch, hf.get, sh)
    assert torch.equal(keys.unpack_grouped(w1, torch.zeros(16, 4), 2)[0][1], fc1)
    assert arch.hf("gate", 3, 5) == "model.layers.3.block_sparse_moe.experts.5.w1.weight"
    with pytest.raises(archs.ConversionError, match="no Hugging Face mapping"):
        mapping.parse("decoder.layers.0.mlp.shared_experts.linear_fc1.weight")


QWEN = dict(model_type="qwen3_moe", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
            vocab_size=100, rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
            norm_topk_prob=False, dtype="bfloat16", tie_word_embeddings=True)


def test_config_mapping_per_architecture_and_back():
    arch, m = archs.model_config_from_hf(QWEN)
    assert (m.head_dim, m.num_query_groups, m.rotary_base, m.params_dtype) == (16, 2, 1000000, "bf16")
    assert m.qk_layernorm and not m.untie_embeddings and not m.router.topk_normalize
    back = archs.hf_config_from_model(arch, m, QWEN)
    assert {k: back[k] for k in QWEN} == QWEN
    mix = dict(QWEN, model_type="mixtral", num_local_experts=4, intermediate_size=16, norm_topk_prob=None)
    arch, m = archs.model_config_from_hf(mix)
    assert m.router.topk_normalize and not m.qk_layernorm and m.moe_ffn_hidden_size == 16
    assert isinstance(m, ModelConfig)


@pytest.mark.parametrize("change,match", [
    (dict(model_type="llama"), r"supported: \['mixtral', 'qwen3_moe'\]"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' \(supported: \['silu'\]\)"),
    (dict(mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), r"rope_type='yarn'; supported: \['default'\]"),
    (dict(dtype="float16"), "pass --dtype"),
])
def test_unsupported_architecture_or_flag_lists_what_is_supported(change, match):
    with pytest.raises(archs.ConversionError, match=match):
        archs.model_config_from_hf(dict(QWEN, **change))


def test_tensor_inventory_reports_missing_extra_and_misshaped():
    arch, m = archs.model_config_from_hf(QWEN)
    want = mapping.expected_hf_shapes(arch, m)
    assert sum(".experts." in k for k in want) == 2 * 4 * 3 and "lm_head.weight" not in want
    have = dict(want)
    del have["model.layers.1.mlp.experts.3.down_proj.weight"]
    have["model.layers.0.mlp.shared_expert.gate_proj.weight"] = (8, 32)
    have["model.norm.weight"] = (31,)
    with pytest.raises(archs.ConversionError, match="1 missing.*experts.3.down_proj.*does not handle.*shared_expert.*unexpected shapes"):
        mapping.check_hf_tensors(have, want, "x")

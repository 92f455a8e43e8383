"""Contract: power iteration finds each expert's top left singular vector, warm starts converge
in <= 2 steps, the expert-TP split (partial step + sum + normalise) equals the whole-W step
(method §2.4)."""

import torch

from megatron_vp2o.algo import prototypes as P


def _planted(num_experts, dim, ffn, spectrum, dtype=torch.float64):
    """W_e = U diag(spectrum) V^T with random orthonormal U, V: a known singular structure."""
    rank = len(spectrum)
    u_EDR = torch.linalg.qr(torch.randn(num_experts, dim, rank, dtype=dtype)).Q
    v_EFR = torch.linalg.qr(torch.randn(num_experts, ffn, rank, dtype=dtype)).Q
    s_R = torch.tensor(spectrum, dtype=dtype)
    return (u_EDR * s_R) @ v_EFR.transpose(-1, -2), u_EDR[..., 0]


def _abs_cos(a_ED, b_ED):
    return ((a_ED * b_ED).sum(-1) / (a_ED.norm(dim=-1) * b_ED.norm(dim=-1))).abs()


def test_matches_svd_on_random_weights():
    weight_EDF = torch.randn(8, 48, 32, dtype=torch.float64)
    protos_ED = P.init_prototypes(weight_EDF, steps=400)
    top_ED = torch.linalg.svd(weight_EDF).U[..., 0]
    assert (_abs_cos(protos_ED, top_ED) > 1 - 1e-6).all()
    assert torch.allclose(protos_ED.norm(dim=-1), torch.ones(8, dtype=torch.float64))


def test_matches_svd_on_near_degenerate_spectrum():
    weight_EDF, _ = _planted(4, 32, 24, [1.0, 0.98, 0.97, 0.5, 0.1])
    protos_ED = P.init_prototypes(weight_EDF, steps=500)
    top_ED = torch.linalg.svd(weight_EDF).U[..., 0]
    assert (_abs_cos(protos_ED, top_ED) > 1 - 1e-6).all()


def test_convergence_rate_is_squared_singular_value_ratio():
    # Rank-2 W: after the first step u lies in span(u1, u2) and tan(angle to u1) shrinks by
    # exactly (s2/s1)^2 per step.
    weight_EDF, top_ED = _planted(3, 16, 12, [2.0, 1.5])
    u1_ED = P.power_iteration(weight_EDF, P.start_vectors(3, 16, dtype=torch.float64), 1)
    u4_ED = P.power_iteration(weight_EDF, u1_ED, 3)

    def tan(u_ED):
        cos_E = _abs_cos(u_ED, top_ED)
        return (1 - cos_E**2).sqrt() / cos_E

    assert torch.allclose(tan(u4_ED), tan(u1_ED) * (1.5 / 2.0) ** 6, rtol=1e-8)


def test_warm_start_converges_in_two_steps_after_small_change():
    weight_EDF, _ = _planted(6, 64, 32, [3.0, 1.5, 1.0, 0.5])
    weight_EDF = weight_EDF + 0.01 * torch.randn_like(weight_EDF)
    protos_ED = P.init_prototypes(weight_EDF, steps=200)
    new_weight_EDF = weight_EDF + 1e-3 * torch.randn_like(weight_EDF)
    new_top_ED = torch.linalg.svd(new_weight_EDF).U[..., 0]
    assert (_abs_cos(protos_ED, new_top_ED) < 1 - 1e-6).any()  # the change matters
    warm_ED = P.power_iteration(new_weight_EDF, protos_ED, steps=2)
    assert (_abs_cos(warm_ED, new_top_ED) > 1 - 1e-6).all()
    # Sign continuity: a power step never flips a prototype.
    assert ((warm_ED * protos_ED).sum(-1) > 0).all()
    cold_ED = P.power_iteration(new_weight_EDF, P.start_vectors(6, 64, dtype=torch.float64), 2)
    assert (_abs_cos(cold_ED, new_top_ED) < 1 - 1e-4).any()


def test_tensor_parallel_split_equals_whole_weight():
    weight_EDF = torch.randn(4, 16, 24, dtype=torch.float64)
    protos_ED = P.normalize(torch.randn(4, 16, dtype=torch.float64))
    expected_ED = P.power_iteration(weight_EDF, protos_ED, steps=3)
    for shards in (2, 4):
        u_ED = protos_ED
        for _ in range(3):
            partial = [P.power_step_partial(w, u_ED) for w in weight_EDF.chunk(shards, dim=-1)]
            u_ED = P.normalize(torch.stack(partial).sum(0))  # the all-reduce
        assert torch.allclose(u_ED, expected_ED, atol=1e-12)


def test_zero_weight_keeps_previous_prototype_and_layers_batch():
    weight_LEDF = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    weight_LEDF[1, 2] = 0.0
    protos_LED = P.normalize(torch.randn(2, 3, 8, dtype=torch.float64))
    out_LED = P.power_iteration(weight_LEDF, protos_LED, steps=2)
    assert torch.isfinite(out_LED).all()
    assert torch.equal(out_LED[1, 2], protos_LED[1, 2])
    for layer in range(2):
        expected_ED = P.power_iteration(weight_LEDF[layer], protos_LED[layer], steps=2)
        assert torch.allclose(out_LED[layer], expected_ED, atol=1e-14)


def test_init_is_deterministic_and_layout_independent():
    weight_EDF = torch.randn(8, 16, 4)
    start_ED = P.start_vectors(8, 16, seed=3)
    assert torch.equal(start_ED[0], start_ED[5])
    assert torch.allclose(start_ED.norm(dim=-1), torch.ones(8))
    assert not torch.allclose(start_ED, P.start_vectors(8, 16, seed=4))
    full_ED = P.init_prototypes(weight_EDF, steps=30, seed=3)
    assert torch.equal(full_ED, P.init_prototypes(weight_EDF, steps=30, seed=3))
    # Expert parallel: ranks holding experts 0-3 and 4-7 get the same prototypes and signs.
    halves = [P.init_prototypes(w, steps=30, seed=3) for w in weight_EDF.chunk(2)]
    assert torch.allclose(torch.cat(halves), full_ED, atol=1e-6)


def test_align_signs():
    protos_ED = P.normalize(torch.randn(5, 7))
    signs_E1 = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0]).unsqueeze(-1)
    assert torch.equal(P.align_signs(protos_ED * signs_E1, protos_ED), protos_ED)


def test_bf16_weights_keep_fp32_prototypes():
    weight_EDF, _ = _planted(4, 32, 16, [2.0, 1.0, 0.5])
    protos_ED = P.init_prototypes(weight_EDF.to(torch.bfloat16), steps=30)
    assert protos_ED.dtype == torch.float32
    top_ED = torch.linalg.svd(weight_EDF).U[..., 0]
    assert (_abs_cos(protos_ED.double(), top_ED) > 1 - 1e-3).all()
    z_ED = P.power_step_partial(weight_EDF.to(torch.bfloat16), protos_ED)
    assert z_ED.dtype == torch.float32

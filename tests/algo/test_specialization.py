"""Contract: the orthogonality loss equals a per-token loop over ordered top-k pairs, vanishes
for orthogonal outputs and ignores masked tokens; the variance loss matches its definition
(method §2.9)."""

import pytest
import torch

from megatron_vp2o.algo import specialization as S


def _ortho_loop(expert_out_TKD, mask_T):
    """Reference: sum over valid tokens and ordered pairs j != k, divided by K * T."""
    num_tokens, top_k, _ = expert_out_TKD.shape
    total, valid = 0.0, 0
    for t in range(num_tokens):
        if not mask_T[t]:
            continue
        valid += 1
        for j in range(top_k):
            for k in range(top_k):
                if j == k:
                    continue
                x_j, x_k = expert_out_TKD[t, j], expert_out_TKD[t, k]
                proj_D = (x_j @ x_k) / (x_k @ x_k + 1e-6) * x_k
                total += float(proj_D @ proj_D)
    return total / (top_k * valid)


@pytest.mark.parametrize("top_k", [2, 4, 8])
def test_orthogonality_equals_per_token_pair_loop(top_k):
    expert_out_TKD = torch.randn(12, top_k, 16, dtype=torch.float64) * torch.rand(12, top_k, 1)
    mask_T = torch.rand(12) > 0.25
    got = S.orthogonality_loss(expert_out_TKD, mask_T)
    assert got.item() == pytest.approx(_ortho_loop(expert_out_TKD, mask_T), rel=1e-12)
    assert got > 0


def test_orthogonality_is_zero_for_orthogonal_outputs():
    basis_TDK = torch.linalg.qr(torch.randn(10, 32, 4, dtype=torch.float64)).Q
    expert_out_TKD = basis_TDK.transpose(1, 2) * torch.rand(10, 4, 1, dtype=torch.float64) * 5
    assert S.orthogonality_loss(expert_out_TKD).abs() < 1e-28


def test_orthogonality_ignores_masked_tokens_and_uses_global_normalizer():
    expert_out_TKD = torch.randn(8, 2, 6, dtype=torch.float64)
    mask_T = torch.tensor([True, False] * 4)
    garbage_TKD = expert_out_TKD.clone()
    garbage_TKD[~mask_T] = float("nan")
    expected = S.orthogonality_loss(expert_out_TKD[mask_T])
    assert torch.allclose(S.orthogonality_loss(garbage_TKD, mask_T), expected)
    # Micro-batching: per-part losses with the global K * T add up to the full-batch loss.
    total, count = S.orthogonality_loss_sum(garbage_TKD, mask_T)
    assert count.item() == 2 * 4
    parts = [S.orthogonality_loss(x, m, normalizer=count) for x, m in
             zip(garbage_TKD.chunk(3), mask_T.chunk(3))]
    assert torch.allclose(sum(parts), expected)


def test_orthogonality_gradient_flows_to_outputs():
    expert_out_TKD = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: S.orthogonality_loss(x), (expert_out_TKD,))


def test_routing_variance_matches_definition():
    probs_TE = torch.softmax(torch.randn(9, 6, dtype=torch.float64) * 2, dim=-1)
    mask_T = torch.rand(9) > 0.3
    mean_T1 = probs_TE.mean(-1, keepdim=True)
    var_T = ((probs_TE - mean_T1) ** 2).sum(-1) / (6 - 1)
    expected = -var_T[mask_T].mean()
    assert torch.allclose(S.routing_variance_loss(probs_TE, mask_T), expected)
    total, count = S.routing_variance_loss_sum(probs_TE, mask_T)
    assert torch.allclose(total / count, expected) and count == mask_T.sum()
    uniform_TE = torch.full((4, 6), 1 / 6, dtype=torch.float64)
    assert S.routing_variance_loss(uniform_TE) == 0
    one_hot_TE = torch.eye(6, dtype=torch.float64)[:4]
    assert S.routing_variance_loss(one_hot_TE).item() == pytest.approx(-1 / 6)


def test_routing_variance_from_logits_equals_general_form_with_gradient():
    logits_TE = (torch.randn(2, 9, 6, dtype=torch.float64) * 2).requires_grad_(True)
    total, count = S.routing_variance_loss_sum_from_logits(logits_TE)
    ref_total, ref_count = S.routing_variance_loss_sum(torch.softmax(logits_TE, -1).reshape(-1, 6))
    assert torch.allclose(total, ref_total) and count == ref_count == 18
    grad, = torch.autograd.grad(total, logits_TE)
    ref_grad, = torch.autograd.grad(ref_total, logits_TE)
    assert torch.allclose(grad, ref_grad)
    assert torch.autograd.gradcheck(lambda x: S.routing_variance_loss_sum_from_logits(x)[0], (logits_TE,))


@pytest.mark.parametrize("top_k", [1, 2, 3, 4, 6])
def test_gated_sum_and_orthogonality_equals_composite_with_gradients(top_k):
    gen = torch.Generator().manual_seed(top_k)
    x_TKD = torch.randn(7, top_k, 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    gates_TK = torch.rand(7, top_k, dtype=torch.float64, generator=gen).requires_grad_(True)
    y_TD, total = S.gated_sum_and_orthogonality(x_TKD, gates_TK)
    ref_y = (x_TKD * gates_TK.unsqueeze(-1)).sum(1)
    ref_total = S.orthogonality_per_token(x_TKD).sum()
    assert torch.allclose(y_TD, ref_y) and torch.allclose(total, ref_total)
    w_TD = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((y_TD * w_TD).sum() + 0.3 * total, (x_TKD, gates_TK))
    want = torch.autograd.grad((ref_y * w_TD).sum() + 0.3 * ref_total, (x_TKD, gates_TK))
    assert all(torch.allclose(a, b) for a, b in zip(got, want))
    assert torch.autograd.gradcheck(lambda x, g: S.gated_sum_and_orthogonality(x, g), (x_TKD, gates_TK))

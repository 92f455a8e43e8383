"""Contract: the scale-invariant orthogonality (squared cosine) equals its definition, ignores output
scale, and traces into one graph; the response-token weights of the fused ortho pass and of the
variance-from-logits loss equal the masked reference (values and gradients)."""

import pytest
import torch

from megatron_vp2o.algo import specialization as S


def _x(t=9, k=3, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, k, d, dtype=torch.float64, generator=gen), gen


def test_cosine_form_equals_definition_and_is_scale_free():
    x_TKD, _ = _x()
    ref_T = torch.zeros(x_TKD.shape[0], dtype=torch.float64)
    for t in range(x_TKD.shape[0]):
        for j in range(x_TKD.shape[1]):
            for k in range(x_TKD.shape[1]):
                if j != k:
                    ref_T[t] += torch.nn.functional.cosine_similarity(x_TKD[t, j], x_TKD[t, k], dim=0) ** 2
    assert torch.allclose(S.orthogonality_cosine_per_token(x_TKD), ref_T, atol=1e-9)
    scaled = x_TKD * torch.tensor([0.5, 1.0, 1e3], dtype=torch.float64).view(1, 3, 1)
    assert torch.allclose(S.orthogonality_cosine_per_token(scaled), ref_T, atol=1e-5)  # up to eps
    # docs/method.md's projection form is not scale-free: x -> 10 x multiplies it by ~100
    assert torch.allclose(S.orthogonality_per_token(10 * x_TKD), 100 * S.orthogonality_per_token(x_TKD), rtol=1e-4)


@pytest.mark.parametrize("form", ["projection", "cosine"])
@pytest.mark.parametrize("top_k", [2, 3, 6])
def test_token_weights_equal_masked_reference(form, top_k):
    x_TKD, gen = _x(k=top_k, seed=top_k)
    x_TKD.requires_grad_(True)
    gates_TK = torch.rand(9, top_k, dtype=torch.float64, generator=gen).requires_grad_(True)
    w_T = (torch.rand(9, generator=gen) > 0.4).double()
    y_TD, total = S.gated_sum_and_orthogonality(x_TKD, gates_TK, w_T, form=form)
    per_token = S.orthogonality_cosine_per_token if form == "cosine" else S.orthogonality_per_token
    ref_y, ref_total = (x_TKD * gates_TK.unsqueeze(-1)).sum(1), (per_token(x_TKD) * w_T).sum()
    assert torch.allclose(y_TD, ref_y) and torch.allclose(total, ref_total)
    v_TD = torch.randn(9, 5, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((y_TD * v_TD).sum() + 0.3 * total, (x_TKD, gates_TK))
    want = torch.autograd.grad((ref_y * v_TD).sum() + 0.3 * ref_total, (x_TKD, gates_TK))
    assert all(torch.allclose(a, b) for a, b in zip(got, want))


def test_variance_from_logits_with_weights_equals_masked_reference():
    gen = torch.Generator().manual_seed(3)
    logits_TE = torch.randn(11, 6, dtype=torch.float64, generator=gen).requires_grad_(True)
    mask_T = torch.rand(11, generator=gen) > 0.5
    total, count = S.routing_variance_loss_sum_from_logits(logits_TE, mask_T.double())
    ref_total, ref_count = S.routing_variance_loss_sum(torch.softmax(logits_TE, -1), mask_T)
    assert torch.allclose(total, ref_total) and count == ref_count == mask_T.sum()
    g = torch.autograd.grad(total, logits_TE)[0]
    assert torch.allclose(g, torch.autograd.grad(ref_total, logits_TE)[0])
    assert torch.all(g[~mask_T] == 0)


def test_unknown_form_names_the_choices():
    x_TKD, _ = _x()
    with pytest.raises(ValueError, match="projection, cosine"):
        S.gated_sum_and_orthogonality(x_TKD, torch.ones(9, 3, dtype=torch.float64), form="sine")


@pytest.mark.parametrize("form", ["projection", "cosine"])
def test_weighted_forms_trace_into_one_graph(form):
    x_TKD, gen = _x(k=2)
    gates_TK, w_T = torch.rand(9, 2, dtype=torch.float64, generator=gen), torch.ones(9, dtype=torch.float64)
    w_T[::3] = 0
    fn = lambda x, g, w: S.gated_sum_and_orthogonality(x, g, w, form=form)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    for a, b in zip(compiled(x_TKD, gates_TK, w_T), fn(x_TKD, gates_TK, w_T)):
        assert torch.allclose(a, b)
    var = torch.compile(S.routing_variance_loss_sum_from_logits, fullgraph=True, backend="eager")
    logits = torch.randn(9, 4, dtype=torch.float64, generator=gen)
    for a, b in zip(var(logits, w_T), S.routing_variance_loss_sum_from_logits(logits, w_T)):
        assert torch.allclose(a, b)

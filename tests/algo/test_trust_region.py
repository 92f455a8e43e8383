"""Contract: barycenters and D_anc match loop references and are sign-invariant, drift is the k3
mean, the tempered ESS has its analytic values, and the refresh rule / decision codes follow
method §2.10-2.12 as device tensors."""

import math

import pytest
import torch

from megatron_vp2o.algo import trust_region as TR
from megatron_vp2o.algo.prototypes import normalize


def _routing(num_tokens=10, num_experts=6, top_k=2):
    idx_TK = torch.topk(torch.rand(num_tokens, num_experts), top_k, dim=-1).indices
    gates_TK = torch.rand(num_tokens, top_k, dtype=torch.float64) + 0.1
    return idx_TK, gates_TK


def test_barycenters_match_loop_reference_with_signs_and_layers():
    idx_TK, gates_TK = _routing()
    protos_ED = normalize(torch.randn(6, 5, dtype=torch.float64))
    signs_E = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    bary_TD = TR.barycenters(idx_TK, gates_TK, protos_ED, signs_E)
    for t in range(10):
        g_K = gates_TK[t] / gates_TK[t].sum()
        expected_D = sum(g_K[k] * signs_E[idx_TK[t, k]] * protos_ED[idx_TK[t, k]] for k in range(2))
        assert torch.allclose(bary_TD[t], expected_D)
    stacked = TR.barycenters(torch.stack([idx_TK, idx_TK.flip(0)]), torch.stack([gates_TK] * 2),
                             torch.stack([protos_ED, -protos_ED]))
    assert torch.allclose(stacked[0], TR.barycenters(idx_TK, gates_TK, protos_ED))
    assert torch.allclose(stacked[1], TR.barycenters(idx_TK.flip(0), gates_TK, -protos_ED))


def test_anchor_distance_is_zero_at_anchor_and_sign_invariant():
    idx_TK, gates_TK = _routing()
    anchor_ED = normalize(torch.randn(6, 5, dtype=torch.float64))
    flipped_ED = anchor_ED * torch.tensor([-1.0, 1, -1, 1, 1, -1], dtype=torch.float64)[:, None]
    args = (idx_TK, gates_TK * 3.0, flipped_ED, idx_TK, gates_TK, anchor_ED)
    assert TR.anchor_distance(*args).abs() < 1e-12


def test_anchor_distance_matches_reference_and_masks_tokens():
    idx_TK, gates_TK = _routing()
    anc_idx_TK, anc_gates_TK = _routing()
    anchor_ED = normalize(torch.randn(6, 5, dtype=torch.float64))
    protos_ED = normalize(anchor_ED + 0.3 * torch.randn(6, 5, dtype=torch.float64))
    mask_T = torch.rand(10) > 0.3
    got = TR.anchor_distance(idx_TK, gates_TK, protos_ED, anc_idx_TK, anc_gates_TK, anchor_ED,
                             mask_T)
    signs_E = torch.sign((protos_ED * anchor_ED).sum(-1))
    diff_TD = (TR.barycenters(idx_TK, gates_TK, protos_ED, signs_E)
               - TR.barycenters(anc_idx_TK, anc_gates_TK, anchor_ED))
    expected = diff_TD.norm(dim=-1)[mask_T].mean()
    assert torch.allclose(got, expected) and 0 < got <= 2
    total, count = TR.anchor_distance_sum(idx_TK, gates_TK, protos_ED, anc_idx_TK, anc_gates_TK,
                                          anchor_ED, mask_T)
    assert count == mask_T.sum() and torch.allclose(total / count, expected)


def test_behaviour_drift_is_k3_mean():
    logp_T, logp_old_T = -torch.rand(2, 20, dtype=torch.float64) * 3
    mask_T = torch.rand(20) > 0.2
    rho_T = torch.exp(logp_T - logp_old_T)
    expected = (rho_T - 1 - torch.log(rho_T))[mask_T].mean()
    assert torch.allclose(TR.behaviour_drift(logp_T, logp_old_T, mask_T), expected)
    assert TR.behaviour_drift(logp_T, logp_T, mask_T) == 0


def test_ess_analytic_values():
    assert torch.allclose(TR.tempered_ess(torch.full((16,), 0.7), 1.0), torch.tensor(1.0))
    dominant_N = torch.tensor([1000.0] + [0.0] * 9)
    assert torch.allclose(TR.tempered_ess(dominant_N, 1.0), torch.tensor(0.1))
    extreme = TR.tempered_ess(torch.tensor([1000.0, -1000.0, 1000.0, -1000.0]), 1.0)
    assert torch.isfinite(extreme) and torch.allclose(extreme, torch.tensor(0.5))
    logratio_N = torch.randn(12, dtype=torch.float64)
    w_N = torch.exp(0.25 * logratio_N)
    expected = w_N.sum() ** 2 / (w_N**2).sum() / 12
    got = TR.tempered_ess(logratio_N, 0.25)
    assert torch.allclose(got, expected) and 0 < got <= 1
    mask_N = torch.tensor([True] * 6 + [False] * 6)
    assert torch.allclose(TR.tempered_ess(logratio_N, 0.25, mask_N),
                          TR.tempered_ess(logratio_N[:6], 0.25))


def test_behaviour_ess_sequence_and_token_levels():
    logp_BT, logp_old_BT = -torch.rand(2, 4, 5, dtype=torch.float64)
    mask_BT = torch.rand(4, 5) > 0.3
    seq_N = torch.where(mask_BT, logp_BT - logp_old_BT, 0.0).sum(-1)
    assert torch.allclose(TR.behaviour_ess(logp_BT, logp_old_BT, mask_BT, 0.25, "sequence"),
                          TR.tempered_ess(seq_N, 0.25))
    token_N = (logp_BT - logp_old_BT)[mask_BT]
    assert torch.allclose(TR.behaviour_ess(logp_BT, logp_old_BT, mask_BT, 1.0, "token"),
                          TR.tempered_ess(token_N, 1.0))
    with pytest.raises(ValueError, match="ess_level"):
        TR.behaviour_ess(logp_BT, logp_old_BT, mask_BT, 1.0, "batch")


@pytest.mark.parametrize(
    "drift, ess, failed, steps, expected",
    [(0.01, 0.9, False, 3, False), (0.03, 0.9, False, 3, True), (0.01, 0.4, False, 3, True),
     (0.01, 0.9, True, 3, True), (0.01, 0.9, False, 8, True), (0.02, 0.5, False, 7, False),
     (float("nan"), 0.9, False, 0, True), (0.01, float("nan"), False, 0, True)],
)
def test_refresh_rule(drift, ess, failed, steps, expected):
    out = TR.refresh_needed(torch.tensor(drift), torch.tensor(ess), torch.tensor(failed),
                            torch.tensor(steps), drift_delta=0.02, ess_min=0.5,
                            max_steps_per_refresh=8)
    assert out.dtype == torch.bool and bool(out) is expected
    plain = TR.refresh_needed(drift, ess, failed, steps, drift_delta=0.02, ess_min=0.5,
                              max_steps_per_refresh=8)
    assert plain.dtype == torch.bool and bool(plain) is expected


@pytest.mark.parametrize(
    "drift, ess, failed, steps, reason",
    [(0.01, 0.9, False, 3, "none"), (0.02, 0.5, False, 7, "none"),  # budgets hold, at their limits too
     (0.01, 0.9, True, 3, "anchor"), (0.5, 0.1, True, 8, "anchor"),  # anchor first, whatever else fails
     (0.03, 0.9, False, 3, "drift"), (float("nan"), 0.9, False, 0, "drift"), (0.5, 0.1, False, 8, "drift"),
     (0.01, 0.4, False, 3, "ess"), (0.01, float("nan"), False, 0, "ess"), (0.01, 0.1, False, 8, "ess"),
     (0.01, 0.9, False, 8, "max_steps"), (0.01, 0.9, False, 9, "max_steps")],
)
def test_refresh_reason_names_the_first_violated_condition(drift, ess, failed, steps, reason):
    kw = dict(drift_delta=0.02, ess_min=0.5, max_steps_per_refresh=8)
    code = TR.refresh_reason(torch.tensor(drift), torch.tensor(ess), torch.tensor(failed), torch.tensor(steps), **kw)
    assert code.dtype == torch.int64 and code.shape == () and TR.REASONS[int(code)] == reason
    assert TR.REASONS[int(TR.refresh_reason(drift, ess, failed, steps, **kw))] == reason  # Python scalars
    needed = TR.refresh_needed(drift, ess, failed, steps, **kw)
    assert bool(needed) is (reason != "none") and bool(needed) is (int(code) != TR.NO_REFRESH)


def test_refresh_reason_batched_rows_are_independent():
    drift = torch.tensor([0.01, 0.5, 0.01, 0.01, 0.01])
    ess = torch.tensor([0.9, 0.9, 0.1, 0.9, 0.9])
    failed = torch.tensor([False, False, False, True, False])
    steps = torch.tensor([0, 0, 0, 0, 8])
    codes = TR.refresh_reason(drift, ess, failed, steps, drift_delta=0.02, ess_min=0.5, max_steps_per_refresh=8)
    assert [TR.REASONS[c] for c in codes.tolist()] == ["none", "drift", "ess", "anchor", "max_steps"]


def test_decisions_and_backtracking():
    ok, bad = torch.tensor(True), torch.tensor(False)
    assert TR.decide(ok, 0) == TR.ACCEPT
    assert [int(TR.decide(bad, a)) for a in range(4)] == [TR.BACKTRACK] * 3 + [TR.REJECT]
    assert TR.decide(bad, 0, "reject") == TR.REJECT and TR.decide(bad, 0, "refresh") == TR.REFRESH
    assert TR.decide(torch.tensor(float("nan")) <= 0.1, 3) == TR.REJECT
    codes = torch.tensor([TR.ACCEPT, TR.BACKTRACK, TR.REJECT, TR.REFRESH])
    assert TR.forces_refresh(codes).tolist() == [False, False, True, True]
    assert TR.backtrack_scales() == (0.5, 0.25, 0.125)
    before_P, after_P = torch.zeros(4), torch.arange(4.0)
    assert torch.equal(TR.scaled_update(before_P, after_P, 0.25), after_P / 4)
    with pytest.raises(ValueError, match="on_violation"):
        TR.decide(bad, 0, "retry")
    assert math.isclose(sum(TR.backtrack_scales(5)), 1 - 2**-5)


def test_ess_batched_rows_are_independent():
    logratio_LN = torch.randn(3, 9, dtype=torch.float64)
    mask_LN = torch.rand(3, 9) > 0.3
    batched_L = TR.tempered_ess(logratio_LN, 0.5, mask_LN)
    for row in range(3):
        assert torch.allclose(batched_L[row], TR.tempered_ess(logratio_LN[row], 0.5, mask_LN[row]))

"""Contract: GRPO / Dr. GRPO / RLOO advantages and the clipped / unclipped policy losses equal
hand-computed values; aggregations and global normalisers compose over micro-batches
(method §2.2-2.3)."""

import math

import pytest
import torch

from megatron_vp2o.algo import grpo

NAN = float("nan")


def test_group_advantages_hand_computed():
    rewards_BG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv_BG = grpo.group_advantages(rewards_BG)
    a0 = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    a2 = 1.0 / (math.sqrt(2 / 3) + 1e-6)
    expected_BG = torch.tensor([[a0, -a0, -a0, a0], [0.0] * 4, [a2, -a2, 0.0, 0.0]])
    assert torch.allclose(adv_BG, expected_BG, atol=1e-6)
    assert torch.equal(adv_BG[1], torch.zeros(4))  # degenerate group: exactly 0
    assert torch.equal(grpo.group_advantages(torch.tensor([[0.1, 0.1, 0.1]])), torch.zeros(1, 3))
    assert torch.equal(grpo.group_advantages(torch.tensor([[2.0]])), torch.zeros(1, 1))


def test_dr_grpo_and_rloo_hand_computed():
    rewards_BG = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(grpo.ADVANTAGES.get("dr_grpo")(rewards_BG),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    loo_BG = torch.tensor([[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]])
    assert torch.allclose(grpo.ADVANTAGES.get("rloo")(rewards_BG), loo_BG)
    assert grpo.ADVANTAGES.names() == ("dr_grpo", "grpo", "rloo")


def _batch():
    """Two sequences (3 and 2 valid tokens) with ratios 1.5, 0.5, 1.0 | 1.1, 0.5; A = 1, -2."""
    ratio_BT = torch.tensor([[1.5, 0.5, 1.0, 1.0], [1.1, 0.5, 1.0, 1.0]], dtype=torch.float64)
    logp_old_BT = -torch.rand(2, 4, dtype=torch.float64)
    logp_BT = logp_old_BT + ratio_BT.log()
    logp_BT[0, 3], logp_BT[1, 2:] = 1e4, NAN  # padding garbage must not leak
    mask_BT = torch.tensor([[True, True, True, False], [True, True, False, False]])
    return logp_BT, logp_old_BT, torch.tensor([1.0, -2.0], dtype=torch.float64), mask_BT


@pytest.mark.parametrize(
    "clip_eps, aggregation, expected",
    [(None, "seq_mean_token_mean", 0.3), (None, "token_mean", 0.04),
     (0.2, "seq_mean_token_mean", 0.5), (0.2, "token_mean", 0.22)],
)
def test_policy_loss_hand_computed(clip_eps, aggregation, expected):
    loss, metrics = grpo.policy_loss(*_batch(), clip_eps=clip_eps, aggregation=aggregation)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["clip_frac"].item() == pytest.approx(0.0 if clip_eps is None else 0.4)
    assert metrics["ratio_mean"].item() == pytest.approx(0.92)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_policy_loss_gradient_and_clipped_tokens():
    logp_BT, logp_old_BT, adv_B, mask_BT = _batch()
    logp_BT.requires_grad_(True)
    for clip_eps in (None, 0.2):
        loss, _ = grpo.policy_loss(logp_BT, logp_old_BT, adv_B, mask_BT, clip_eps=clip_eps)
        (grad_BT,) = torch.autograd.grad(loss, logp_BT)
        ratio_BT = torch.tensor([[1.5, 0.5, 1.0, 0.0], [1.1, 0.5, 0.0, 0.0]], dtype=torch.float64)
        # d/dlogp of -(1/B)(1/|o_b|) rho A = -(1/2)(1/|o_b|) rho A
        lengths_B1 = torch.tensor([[3.0], [2.0]], dtype=torch.float64)
        expected_BT = -0.5 * ratio_BT * adv_B[:, None] / lengths_B1
        if clip_eps is not None:
            expected_BT[0, 0] = expected_BT[1, 1] = 0.0  # clipped: no gradient
        assert torch.allclose(grad_BT, expected_BT)


def test_kl_penalty_hand_computed():
    logp_BT, logp_old_BT, adv_B, mask_BT = _batch()
    logp_ref_BT = logp_BT + math.log(2.0)  # k3 = 2 - log 2 - 1 per token
    loss, metrics = grpo.policy_loss(logp_BT, logp_old_BT, adv_B, mask_BT, kl_coef=0.1,
                                     logp_ref=logp_ref_BT)
    assert loss.item() == pytest.approx(0.3 + 0.1 * (1 - math.log(2)), abs=1e-12)
    assert metrics["kl_ref"].item() == pytest.approx(1 - math.log(2))
    with pytest.raises(ValueError, match="logp_ref"):
        grpo.policy_loss(logp_BT, logp_old_BT, adv_B, mask_BT, kl_coef=0.1)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_global_normalizer_over_micro_batches(aggregation):
    logp_BT, logp_old_BT = -torch.rand(2, 6, 5, dtype=torch.float64)
    adv_B = torch.randn(6, dtype=torch.float64)
    mask_BT = torch.rand(6, 5) > 0.4
    mask_BT[:, 0] = True
    full, _ = grpo.policy_loss(logp_BT, logp_old_BT, adv_B, mask_BT, aggregation=aggregation)
    normalizer = grpo.aggregation_count(mask_BT, aggregation)
    splits = [x.split([2, 4]) for x in (logp_BT, logp_old_BT, adv_B, mask_BT)]
    parts = [grpo.policy_loss(*micro, aggregation=aggregation, normalizer=normalizer)[0]
             for micro in zip(*splits)]
    assert torch.allclose(parts[0] + parts[1], full)


def test_policy_loss_registry():
    batch = _batch()
    clipped = grpo.POLICY_LOSSES.get("grpo_clip")(*batch)[0]
    assert torch.allclose(clipped, grpo.policy_loss(*batch, clip_eps=0.2)[0])
    assert grpo.POLICY_LOSSES.get("vp2o")(*batch)[0].item() == pytest.approx(0.3)
    assert torch.allclose(grpo.POLICY_LOSSES.get("vp2o")(*batch, clip_eps=0.2)[0], clipped)
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'; choices: grpo_clip, vp2o"):
        grpo.POLICY_LOSSES.get("ppo")
    with pytest.raises(ValueError, match="choices: seq_mean_token_mean, token_mean"):
        grpo.policy_loss(*batch, aggregation="sum")

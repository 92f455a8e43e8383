"""Contract: policy/ratio_{p50,p99,max} (rl.learner.forward.ratio_stats) are the nearest-rank
quantiles and the max of pi/mu over the counted tokens of every recorded micro-batch, checked
against a hand computation on a scripted batch of known ratios (padding and uncounted tokens
ignored, micro-batches of different shapes pooled); NaN when nothing was counted."""

from __future__ import annotations

import math

import torch

from megatron_vp2o.rl.learner.forward import ratio_stats, record_ratios


def test_scripted_ratios_against_hand_computation():
    log = []
    # micro-batch 1: 2 x 3, counted ratios 0.5, 1, 2, 4 (two padded tokens with huge "ratios")
    ratio_1 = torch.tensor([[0.5, 1.0, 1e6], [2.0, 4.0, 1e6]])
    mask_1 = torch.tensor([[1, 1, 0], [1, 1, 0]])
    record_ratios(log, ratio_1.log(), torch.zeros(2, 3), mask_1)
    # micro-batch 2: 1 x 5 (another shape), counted ratios 0.25, 8, 1.5; log mu != 0
    logp_old = torch.full((1, 5), -0.7)
    ratio_2 = torch.tensor([[0.25, 8.0, 1.5, 3e5, 1e-9]])
    record_ratios(log, ratio_2.log() + logp_old, logp_old, torch.tensor([[1, 1, 1, 0, 0]]))
    got = {k: float(v) for k, v in ratio_stats(log, torch.device("cpu")).items()}
    counted = sorted([0.5, 1.0, 2.0, 4.0, 0.25, 8.0, 1.5])  # 7 tokens
    rank = lambda q: counted[max(math.ceil(q * len(counted)) - 1, 0)]  # noqa: E731 (nearest rank)
    assert got["policy/ratio_p50"] == pytest_approx(rank(0.5)) == pytest_approx(1.5)
    assert got["policy/ratio_p99"] == pytest_approx(rank(0.99)) == pytest_approx(8.0)
    assert got["policy/ratio_max"] == pytest_approx(8.0)


def test_nothing_counted_is_nan():
    log = []
    record_ratios(log, torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    assert all(math.isnan(float(v)) for v in ratio_stats(log, torch.device("cpu")).values())
    assert all(math.isnan(float(v)) for v in ratio_stats([], torch.device("cpu")).values())


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5)

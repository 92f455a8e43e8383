"""Contract: policy/ratio_{p50,p99,max} (rl.learner.forward.ratio_stats) are the nearest-rank
quantiles and the max of pi/mu over the counted tokens of every recorded micro-batch, checked
against a hand computation on a scripted batch of known ratios (padding and uncounted tokens
ignored, micro-batches of different shapes pooled); NaN when nothing was counted. At the first update
of the tiny recipe (VP2O, trust region on) the learner has not moved yet: exactly the step's loss
micro-batches are recorded, each with log pi == log mu (1e-5, fp32) on every response token -- the
trust region's forward-only post-step re-route is not a loss micro-batch (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch

from e2e.test_rl import QUICK
from harness import run_world
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


@pytest.fixture(scope="module")
def first_update(tmp_path_factory):
    # two micro-batches (16 sequences, micro-batch 8); max_new_tokens 6 as the recipe
    overrides = QUICK + ["rl.algo=vp2o", "rl.micro_batch_size=8", "rl.sampling.max_new_tokens=6"]
    return run_world(1, "rl.worlds_ratio_stats:first_update",
                     {"out": str(tmp_path_factory.mktemp("first")), "overrides": overrides}, timeout_s=300)


def test_first_update_learner_logprobs_equal_behaviour(first_update):
    row, recorded = first_update["row"], first_update["recorded"]
    assert math.isfinite(row["vp2o/d_anc"]), row  # the trust region ran its post-step re-route
    assert [n for n, _ in recorded] == first_update["loss_tokens"]  # the loss micro-batches, once each
    assert all(n > 0 and worst <= 1e-5 for n, worst in recorded), recorded
    for key in ("policy/ratio_p50", "policy/ratio_p99", "policy/ratio_max"):
        assert abs(row[key] - 1.0) <= 1e-5, (key, row[key])

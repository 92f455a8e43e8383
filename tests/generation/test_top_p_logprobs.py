"""Contract: with top-p/top-k < full, a token outside the scorer's filtered set gets a finite log-prob
(the filtered distribution with its support extended by that token), tokens inside get exactly the
filtered log-prob, and the behaviour drift stays finite (issue 14)."""

import torch

from megatron_vp2o.algo import trust_region as tr
from megatron_vp2o.generation.sampling import SamplingConfig, filter_logits, sample, sampling_logprobs, token_logprobs

CFG = SamplingConfig(temperature=0.7, top_p=0.5)


def _logits():
    actor_BV = torch.tensor([[0.0, 0.2, 3.0, 0.1, -1.0, 0.0], [2.0, 1.9, 0.0, -2.0, 0.5, 0.0]])
    learner_BV = actor_BV.clone()
    learner_BV[0, 0] = 4.0  # the learner moved: token 2 leaves its nucleus in row 0
    return actor_BV, learner_BV


def test_token_outside_the_nucleus_is_finite_and_matches_the_extended_support():
    actor_BV, learner_BV = _logits()
    tokens_B = torch.tensor([2, 1])
    old_B = sampling_logprobs(learner_BV, CFG).gather(-1, tokens_B[:, None]).squeeze(-1)
    assert old_B[0] == float("-inf")  # the pre-issue-14 definition: -inf, infinite drift
    new_B = token_logprobs(learner_BV, tokens_B, CFG)
    assert torch.isfinite(new_B).all()
    z_V = learner_BV[0] / CFG.temperature
    keep_V = torch.isfinite(filter_logits(learner_BV, CFG)[0])
    assert not keep_V[2]
    keep_V[2] = True
    assert torch.allclose(new_B[0], z_V[2] - torch.logsumexp(z_V[keep_V], -1))
    assert torch.allclose(new_B[1], old_B[1])  # inside the nucleus: the filtered log-prob itself


def test_inside_tokens_equal_the_filtered_distribution_and_actor_samples_are_unchanged():
    g = torch.Generator().manual_seed(0)
    logits_BV = torch.randn(64, 11, generator=g) * 2
    for cfg in (CFG, SamplingConfig(top_k=3), SamplingConfig(temperature=1.3, top_p=0.8, top_k=5),
                SamplingConfig(temperature=0.0), SamplingConfig()):
        tokens_B, logp_B = sample(logits_BV, cfg, torch.Generator().manual_seed(1))
        assert torch.allclose(token_logprobs(logits_BV, tokens_B, cfg), logp_B, atol=1e-6)
        every_BV = torch.arange(11).expand(64, 11)
        ref_BV = sampling_logprobs(logits_BV, cfg)
        got_BV = token_logprobs(logits_BV.repeat_interleave(11, 0), every_BV.reshape(-1), cfg).view(64, 11)
        inside = torch.isfinite(ref_BV)
        assert torch.allclose(got_BV[inside], ref_BV[inside], atol=1e-6)
        assert torch.isfinite(got_BV).all()


def test_drift_and_gradient_stay_finite_when_the_learner_leaves_the_actor_nucleus():
    actor_BV, learner_BV = _logits()
    tokens_B, logp_old_B = sample(actor_BV, CFG, torch.Generator().manual_seed(3))
    tokens_B[0] = 2  # the actor's top token, outside the learner's nucleus
    logp_old_B = token_logprobs(actor_BV, tokens_B, CFG)
    learner_BV.requires_grad_(True)
    logp_B = token_logprobs(learner_BV, tokens_B, CFG)
    drift, n = tr.behaviour_drift_sum(logp_B, logp_old_B)
    assert torch.isfinite(drift) and n == 2
    assert torch.isfinite(tr.tempered_ess(tr.sequence_logratio(logp_B[:, None], logp_old_B[:, None],
                                                                torch.ones(2, 1)), 0.5))
    logp_B.sum().backward()
    assert torch.isfinite(learner_BV.grad).all() and learner_BV.grad[0, 2] > 0
    old_drift, _ = tr.behaviour_drift_sum(sampling_logprobs(learner_BV.detach(), CFG).gather(
        -1, tokens_B[:, None]).squeeze(-1), logp_old_B)
    assert old_drift == float("inf")  # what the learner logged before

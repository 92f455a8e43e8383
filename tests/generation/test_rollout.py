"""Contract: rollouts decode with a KV cache exactly like a full forward (logits, routing) in every layout,
log the log-prob of the distribution they sample from, stop and mask correctly, and replay routing (R3)
exactly or fail loudly."""

from __future__ import annotations

import pytest
import torch

from harness import run_world
from megatron_vp2o.generation import Rollouts, SamplingConfig, left_pad
from megatron_vp2o.generation.rollouts import attention_mask, positions_from_pads
from megatron_vp2o.generation.sampling import filter_logits, sample, sampling_logprobs

LAYOUTS = {"ep2": {"ep": 2}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}


@pytest.fixture(scope="module")
def single():
    return run_world(1, "generation.worlds_rollout:single", {}, timeout_s=240)


@pytest.fixture(scope="module")
def layouts():
    return run_world(2, "generation.worlds_rollout:layouts", LAYOUTS, timeout_s=240)


# ---- pure sampling / layout (no megatron) ----

@pytest.mark.parametrize("kwargs, field", [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                           ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
                                           ({"max_new_tokens": 0}, "max_new_tokens"),
                                           ({"stop_token_ids": (-1,)}, "stop_token_ids")])
def test_sampling_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingConfig(**kwargs)


def test_filters_and_logprob_definition():
    logits_BV = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0]])
    cfg = SamplingConfig(temperature=0.5, top_k=3)
    z = filter_logits(logits_BV, cfg)
    assert torch.isinf(z).sum() == 3 and torch.isfinite(z[0, [0, 1, 4]]).all()
    logp = sampling_logprobs(logits_BV, cfg)
    assert torch.allclose(logp[0, [0, 1, 4]], torch.log_softmax(logits_BV[0, [0, 1, 4]] / 0.5, -1))
    nucleus = filter_logits(logits_BV, SamplingConfig(top_p=0.7))  # p(4)=.61 < .7 <= p(4)+p(0): keeps 4 and 0
    assert torch.isfinite(nucleus).nonzero()[:, 1].tolist() == [0, 4]
    assert torch.isfinite(filter_logits(logits_BV, SamplingConfig(top_p=1e-6))).sum() == 1
    padded = sampling_logprobs(logits_BV, SamplingConfig(), vocab_size=4)  # ids >= 4 are vocabulary padding
    assert torch.isinf(padded[0, 4:]).all()
    tok, lp = sample(logits_BV, SamplingConfig(temperature=0.0), None)  # greedy logs the raw log-softmax
    assert tok.item() == 4 and lp.item() == pytest.approx(torch.log_softmax(logits_BV, -1)[0, 4].item())


def test_top_k_1_and_tiny_top_p_equal_greedy_and_seeds_reproduce():
    logits_BV = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    greedy, _ = sample(logits_BV, SamplingConfig(temperature=0.0), None)
    for cfg in (SamplingConfig(top_k=1), SamplingConfig(top_p=1e-6)):
        assert torch.equal(sample(logits_BV, cfg, torch.Generator().manual_seed(1))[0], greedy)
    a = sample(logits_BV, SamplingConfig(temperature=1.3, top_p=0.9), torch.Generator().manual_seed(7))
    b = sample(logits_BV, SamplingConfig(temperature=1.3, top_p=0.9), torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_left_padding_positions_and_mask():
    ids_BP, lens_B = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids_BP.tolist() == [[5, 6, 7], [0, 0, 9]] and lens_B.tolist() == [3, 1]
    pads_B = 3 - lens_B
    assert positions_from_pads(pads_B, 5).tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    m = attention_mask(pads_B, 3, 3)  # True = masked
    assert m[1, 0, 2].tolist() == [True, True, False]  # real token ignores left pads
    assert m[1, 0, 1].tolist() == [True, False, True]  # a pad query keeps only itself (no empty softmax row)
    assert m[0, 0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert attention_mask(pads_B, 1, 4)[1, 0, 0].tolist() == [True, True, False, False]


def test_training_input_aligns_labels_with_response():
    r = Rollouts(torch.tensor([[0, 5], [6, 7]]), torch.tensor([1, 2]), torch.tensor([[8, 2, 0], [9, 9, 9]]),
                 torch.tensor([[1.0, 1, 0], [1, 1, 1]]), torch.zeros(2, 3), torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]),
                 torch.zeros(1, 2, 4, 2, dtype=torch.long), torch.zeros(1, 2, 4, 2), ["stop", "length"],
                 SamplingConfig(stop_token_ids=(2,)), pad_id=0)
    batch = r.training_input()
    assert batch.tokens_BS.tolist() == [[0, 5, 8, 2], [6, 7, 9, 9]]
    assert batch.labels_BS.tolist() == [[5, 8, 2, 0], [7, 9, 9, 9]]
    assert batch.loss_mask_BS.tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]
    assert r.sequences() == [[5, 8, 2], [6, 7, 9, 9, 9]]
    assert r.topk_idx_LBTK.shape == (1, 2, 3, 2)


# ---- megatron model, real ranks ----

def test_cached_decoding_equals_full_forward_one_rank(single):
    p = single["parity"]
    assert p["max_logit_diff"] < 1e-5 and p["max_logp_diff"] < 1e-5, p
    assert p["topk_agreement"] == 1.0 and p["gate_diff"] < 1e-5
    assert p["r3_agreement"] == 1.0 and p["r3_logp_diff"] < 1e-5
    assert p["routing_shape"] == (2, 4, 7 + 8 - 1, 2)  # L, B, S = P + T - 1, K
    q = single["parity_unpadded"]  # equal prompt lengths: the mask-free, shared-RoPE decoding path
    assert q["max_logit_diff"] < 1e-5 and q["max_logp_diff"] < 1e-5 and q["topk_agreement"] == 1.0, q
    assert q["routing_shape"] == (2, 3, 5 + 6 - 1, 2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_decoding_equals_full_forward_in_layout(layouts, name):
    p = layouts[name]
    assert p["max_logit_diff"] < 1e-5 and p["max_logp_diff"] < 1e-5, p
    assert p["topk_agreement"] == 1.0 and p["r3_agreement"] == 1.0, p
    assert p["layers"] == [1, 2]  # PP: both stages' routing gathered on every rank


def test_greedy_top1_nocache_and_seeds(single):
    s = single["sampling"]
    assert torch.equal(s["greedy_ids"], s["argmax_ids"])
    assert torch.equal(s["top1_ids"], s["greedy_ids"])
    assert torch.equal(s["nocache_ids"], s["greedy_ids"]) and s["nocache_topk_agreement"] == 1.0
    assert s["seeded_equal"] and s["other_seed_differs"]


def test_stop_tokens_end_sequences_and_mask_after(single):
    r, stop_ids = single["sampling"]["stop"], single["sampling"]["stop_ids"]
    for b, reason in enumerate(r.finish_reason):
        n = int(r.response_mask_BT[b].sum())
        ids = r.response_ids_BT[b]
        assert r.response_mask_BT[b, :n].eq(1).all() and r.response_mask_BT[b, n:].eq(0).all()
        assert (ids[n:] == 0).all() and (r.logp_BT[b, n:] == 0).all() and (r.logp_BT[b, :n] < 0).all()
        is_stop = [int(t) in stop_ids for t in ids[:n]]
        assert (reason == "stop") == is_stop[-1] and not any(is_stop[:-1])
    assert "stop" in r.finish_reason and r.response_mask_BT.sum(1).unique().numel() > 1


def test_replay_reproduces_routing_after_drift_and_catches_bad_rows(single):
    rp = single["replay"]
    assert rp["drift_agreement"] < 1.0  # the perturbed router routes differently on its own
    assert rp["replay_agreement"] == 1.0
    assert "replay rows for" in rp["errors"]["too_few_rows"]
    assert "wrong order" in rp["errors"]["batch_major"]
    assert "moe_enable_routing_replay" in single["replay_disabled_error"]

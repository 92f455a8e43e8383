"""Contract: rl.engine_is_cap (truncated importance weight on the rollout engine's mismatch, verl / slime's
TIS) gives w = min(exp(logp_behaviour - logp_engine), cap) per response token (hand-computed), scales the
learner batches' advantages per token (1 off the response), leaves the batches -- and the policy loss and its
gradient -- bit-identical to rl.engine_is_cap=null when the engine's log-probs are the behaviour log-probs
(megatron engine), keeps the engine's log-probs in the saved buffer, reports rollout/is_weight_mean and
rollout/is_capped_frac, and is refused at config load below 1 with one message naming the field."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from harness import ROOT
from megatron_vp2o.algo import grpo
from megatron_vp2o.checkpoint.state import from_plain, to_plain
from megatron_vp2o.config import ConfigError, load_config
from megatron_vp2o.generation.rollouts import Rollouts
from megatron_vp2o.generation.sampling import SamplingConfig
from megatron_vp2o.generation.vllm_engine import truncated_is_weight
from megatron_vp2o.rl.batches import engine_is_metrics, engine_is_weights, make_batches

TINY = str(ROOT / "examples/configs/tiny_cpu.yaml")
BEHAVIOUR_BT = torch.tensor([[-0.9, -2.5, 0.0], [-1.0, -0.2, -3.0]])  # learner's recomputed log-probs
ENGINE_BT = torch.tensor([[-1.0, -2.0, 0.0], [-2.0, -0.2, -3.5]])  # the engine's (vLLM's) own


def _rollouts(engine_logp_BT=ENGINE_BT) -> Rollouts:
    """Two sequences, prompts of 2 and 1 tokens (left-padded to P = 2), T = 3 responses; the first stops
    after 2 tokens (mask 1 1 0), the second runs to the end."""
    mask_BT = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    s = 2 + 3 - 1
    return Rollouts(prompt_ids_BP=torch.tensor([[5, 6], [0, 7]]), prompt_lens_B=torch.tensor([2, 1]),
                    response_ids_BT=torch.tensor([[8, 2, 0], [9, 9, 9]]), response_mask_BT=mask_BT,
                    logp_BT=BEHAVIOUR_BT * mask_BT, positions_BS=torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]]),
                    topk_idx_LBSK=torch.zeros(1, 2, s, 2, dtype=torch.long), gates_LBSK=torch.full((1, 2, s, 2), 0.5),
                    finish_reason=["stop", "length"], sampling=SamplingConfig(stop_token_ids=(2,)), pad_id=0,
                    vocab_size=10, moe_layers=[1],
                    engine_logp_BT=None if engine_logp_BT is None else engine_logp_BT * mask_BT)


def test_weight_formula_by_hand():
    w = truncated_is_weight(ENGINE_BT, BEHAVIOUR_BT, 2.0)
    hand = [[math.exp(0.1), math.exp(-0.5), 1.0], [min(math.exp(1.0), 2.0), 1.0, min(math.exp(0.5), 2.0)]]
    assert torch.allclose(w, torch.tensor(hand), atol=1e-6, rtol=0)
    assert w[1, 0].item() == 2.0  # exp(1) = 2.718 capped
    assert truncated_is_weight(BEHAVIOUR_BT, BEHAVIOUR_BT, 1.0).eq(1.0).all()  # equal log-probs: exactly 1


def test_batch_advantages_scaled_per_token():
    r, adv_B = _rollouts(), torch.tensor([0.5, -1.5])
    w_BT = engine_is_weights(r, 2.0)
    assert w_BT[0, 2].item() == 1.0  # off the response (masked token): weight 1
    batches = make_batches(r, adv_B, micro_batch_size=1, engine_is_cap=2.0)
    adv_BS = torch.cat([b.adv for b in batches])
    assert adv_BS.shape == (2, 4)
    cols = r.response_cols  # P-1 .. P+T-2 = 1 .. 3
    assert torch.equal(adv_BS[:, cols], adv_B[:, None] * w_BT)
    assert torch.equal(adv_BS[:, 0], adv_B)  # prompt column: the sequence advantage, weight 1
    assert adv_BS[1, 1].item() == pytest.approx(-1.5 * 2.0)  # the capped token
    assert adv_BS[0, 1].item() == pytest.approx(0.5 * math.exp(0.1))
    padded = make_batches(r, adv_B, micro_batch_size=2, pad_to=3, engine_is_cap=2.0)[0]  # sequence parallel pad
    assert padded.adv.shape == (2, 6) and torch.equal(padded.adv[:, :4], adv_BS) and padded.adv[:, 4:].eq(
        adv_B[:, None]).all()


@pytest.mark.parametrize("loss", ["vp2o", "grpo_clip"])
def test_megatron_engine_is_bit_identical_to_no_cap(loss):
    """Megatron engine: no separate engine log-probs (they are the behaviour ones), so w = 1 exactly and the
    loss and its gradient equal rl.engine_is_cap=null's bit for bit, for both algorithms' losses."""
    r, adv_B = _rollouts(engine_logp_BT=None), torch.tensor([0.5, -1.5])
    same = dataclasses.replace(r, engine_logp_BT=r.logp_BT.clone())  # explicit copy: the same weights
    off = make_batches(r, adv_B, micro_batch_size=2)[0]
    for rollouts in (r, same):
        on = make_batches(rollouts, adv_B, micro_batch_size=2, engine_is_cap=2.0)[0]
        assert torch.equal(on.adv, off.adv[:, None].expand_as(on.adv))
        results = []
        for batch in (off, on):
            logp_BS = (batch.logp_old + 0.1 * torch.arange(4.0)).requires_grad_(True)
            value, _ = grpo.POLICY_LOSSES.get(loss)(logp_BS, batch.logp_old, batch.adv, batch.loss_mask,
                                                   clip_eps=0.2)
            value.backward()
            results.append((value.detach(), logp_BS.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert engine_is_metrics(r, 2.0) == {"rollout/is_weight_mean": 1.0, "rollout/is_capped_frac": 0.0}
    assert engine_is_metrics(r, None) == {}


def test_metrics_mean_weight_and_capped_fraction():
    m = engine_is_metrics(_rollouts(), 2.0)
    w = [math.exp(0.1), math.exp(-0.5), 2.0, 1.0, min(math.exp(0.5), 2.0)]  # the 5 response tokens
    assert m["rollout/is_weight_mean"] == pytest.approx(sum(w) / 5, rel=1e-6)
    assert m["rollout/is_capped_frac"] == pytest.approx(1 / 5)


def test_engine_logp_travel_with_the_saved_buffer():
    r = _rollouts()
    back = from_plain(to_plain({"rollouts": r}))["rollouts"]
    assert torch.equal(back.engine_logp_BT, r.engine_logp_BT)
    old = to_plain(r)  # a buffer saved before the field existed rebuilds with None (weights 1)
    del old["fields"]["engine_logp_BT"]
    assert from_plain(old).engine_logp_BT is None and torch.equal(from_plain(old).engine_logp, r.logp_BT)


def test_config_default_and_refusal():
    assert load_config(TINY, []).rl.engine_is_cap is None
    assert load_config(TINY, ["rl.engine_is_cap=2"]).rl.engine_is_cap == 2.0
    assert load_config(TINY, ["rl.engine_is_cap=1"]).rl.engine_is_cap == 1.0
    for bad in ("0.5", "0", "-2"):
        with pytest.raises(ConfigError) as info:
            load_config(TINY, [f"rl.engine_is_cap={bad}"])
        assert str(info.value) == (f"rl.engine_is_cap must be >= 1 (a truncation cap on the engine-mismatch weight; "
                                   f"verl uses 2) or null (off) (got {float(bad)!r})")

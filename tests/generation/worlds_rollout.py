"""Functions that run inside test worlds for tests/generation/test_rollout.py (one launch per world size).

``single`` (1 rank) checks cached decoding against a full forward, the sampling contracts, routing
replay (R3) and its failure checks; ``layouts`` (2 ranks) re-initialises megatron's parallel state for
EP=2, TP=2 and PP=2 in turn (one torchrun start-up for all three) and checks cached decoding against
the teacher-forced forward in each. Every check returns plain numbers; the test asserts on them.

Shape legend: B sequences, T response tokens, V vocabulary, L MoE layers, S columns, K top-k.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from distributed.worlds_foundation import tiny_config

VOCAB = 60  # real vocabulary of the test prompts (the model's is 64: ids 60..63 are "padding")
PROMPT_LENS = (3, 7, 5, 1)


def prompts(lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


def build(parallel: dict | None = None, replay: bool = True):
    from megatron.core import parallel_state as ps

    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.model import build_gpt, transformer_config

    cfg = tiny_config(parallel)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_parallel(cfg)
    model = build_gpt(cfg.model, transformer_config(cfg.model, cfg.parallel, moe_enable_routing_replay=replay))
    model.eval()
    return model


def _same_sets(a_LBSK, b_LBSK) -> float:
    return (a_LBSK.sort(-1).values == b_LBSK.sort(-1).values).all(-1).float().mean().item()


def _world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def cache_parity(model, prompt_ids, sampling) -> dict:
    """Cached decoding vs one full forward over the same tokens and positions (this rank's layout)."""
    from megatron_vp2o.generation import MegatronEngine, teacher_forced_logprobs

    eng = MegatronEngine(model, pad_id=0, vocab_size=VOCAB, keep_logits=True)
    r = eng.generate(prompt_ids, sampling)
    with torch.no_grad():
        tf = teacher_forced_logprobs(model, r)
        tf_r3 = teacher_forced_logprobs(model, r, replay=True)
    dlogit = 0.0 if tf.logits_BTV is None else (tf.logits_BTV - eng.last_logits_BTV).abs().max().item()
    return {"max_logit_diff": _world_max(dlogit), "max_logp_diff": _world_max((tf.logp_BT - r.logp_BT).abs().max().item()),
            "topk_agreement": 1.0 - _world_max(1.0 - _same_sets(tf.topk_idx_LBSK, r.topk_idx_LBSK)),
            "r3_agreement": 1.0 - _world_max(1.0 - _same_sets(tf_r3.topk_idx_LBSK, r.topk_idx_LBSK)),
            "r3_logp_diff": _world_max((tf_r3.logp_BT - r.logp_BT).abs().max().item()),
            "gate_diff": (tf.gates_LBSK - r.gates_LBSK).abs().max().item(),
            "routing_shape": tuple(r.topk_idx_LBSK.shape), "layers": r.moe_layers, "rollouts": r}


def sampling_checks(model) -> dict:
    from megatron_vp2o.generation import MegatronEngine, SamplingConfig

    eng = MegatronEngine(model, pad_id=0, vocab_size=VOCAB, keep_logits=True)
    p = prompts()
    greedy = eng.generate(p, SamplingConfig(temperature=0.0, max_new_tokens=6))
    argmax_BT = eng.last_logits_BTV[..., :VOCAB].argmax(-1)
    top1 = eng.generate(p, SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=6, seed=5))
    s1 = eng.generate(p, SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=3))
    s2 = eng.generate(p, SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=3))
    s3 = eng.generate(p, SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=4))
    stop_ids = tuple(range(3, 40))  # most tokens stop: sequences end at different steps
    stop = eng.generate(p, SamplingConfig(temperature=1.5, max_new_tokens=8, stop_token_ids=stop_ids, seed=2))
    nocache = MegatronEngine(model, pad_id=0, vocab_size=VOCAB, use_cache=False).generate(
        p, SamplingConfig(temperature=0.0, max_new_tokens=6))
    return {"greedy_ids": greedy.response_ids_BT, "argmax_ids": argmax_BT, "top1_ids": top1.response_ids_BT,
            "seeded_equal": torch.equal(s1.response_ids_BT, s2.response_ids_BT) and torch.equal(s1.logp_BT, s2.logp_BT),
            "other_seed_differs": not torch.equal(s1.response_ids_BT, s3.response_ids_BT),
            "stop": stop, "stop_ids": stop_ids, "nocache_ids": nocache.response_ids_BT,
            "nocache_topk_agreement": _same_sets(nocache.topk_idx_LBSK, greedy.topk_idx_LBSK)}


def replay_checks(model, r) -> dict:
    """R3: after a router perturbation (a stand-in for a training step) routing drifts; replay restores it."""
    from megatron_vp2o.generation import teacher_forced_logprobs
    from megatron_vp2o.generation.routing import ReplayError, moe_routers

    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for router in moe_routers(model):
            router.weight.add_(0.3 * router.weight.std() * torch.randn(router.weight.shape, generator=g))
        drifted = teacher_forced_logprobs(model, r)
        replayed = teacher_forced_logprobs(model, r, replay=True)
    errors = {}
    bad = {"too_few_rows": r.topk_idx_LBSK[:, :, :-1],
           "batch_major": r.topk_idx_LBSK.transpose(1, 2).reshape(r.topk_idx_LBSK.shape)}
    for name, idx in bad.items():
        try:
            with torch.no_grad():
                teacher_forced_logprobs(model, dataclasses.replace(r, topk_idx_LBSK=idx), replay=True)
            errors[name] = None
        except ReplayError as e:
            errors[name] = str(e)
    return {"drift_agreement": _same_sets(drifted.topk_idx_LBSK, r.topk_idx_LBSK),
            "replay_agreement": _same_sets(replayed.topk_idx_LBSK, r.topk_idx_LBSK),
            "own_vs_replayed": replayed.replay_agreement, "errors": errors}


def single(payload):
    from megatron_vp2o.generation import SamplingConfig

    model = build()
    parity = cache_parity(model, prompts(), SamplingConfig(temperature=0.8, top_k=20, max_new_tokens=8, seed=1))
    out = {"parity": parity, "sampling": sampling_checks(model)}
    # no left padding: decoding runs with no attention mask and one RoPE table for all rows
    unpadded = cache_parity(model, prompts((5, 5, 5)), SamplingConfig(temperature=0.8, max_new_tokens=6, seed=2))
    out["parity_unpadded"] = {k: v for k, v in unpadded.items() if k != "rollouts"}
    out["replay"] = replay_checks(model, parity["rollouts"])
    no_r3 = build(replay=False)
    try:
        from megatron_vp2o.generation import teacher_forced_logprobs

        teacher_forced_logprobs(no_r3, parity["rollouts"], replay=True)
        out["replay_disabled_error"] = None
    except RuntimeError as e:
        out["replay_disabled_error"] = str(e)
    return out


def layouts(payload):
    """2 ranks: EP=2 (ranks hold different prompts, as DP ranks do), TP=2, PP=2."""
    from megatron_vp2o.generation import SamplingConfig

    out = {}
    for name, par in payload.items():
        model = build(par)
        rank = dist.get_rank()
        lens = PROMPT_LENS if (name != "ep2" or rank == 0) else (6, 2, 4)  # EP ranks are attention-DP ranks
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, stop_token_ids=(5, 6, 7) if rank else (), seed=1)
        res = cache_parity(model, prompts(lens, seed=rank if name == "ep2" else 0), sampling)
        res.pop("rollouts")
        out[name] = res
    return out

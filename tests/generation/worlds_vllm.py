"""Functions that run inside the one-rank world of tests/generation/test_vllm_engine.py.

``checks`` loads the tiny policy (checkpoints/tiny_policy, examples/configs/tiny_cpu.yaml: 4 layers, hidden
128, 4 heads of head_dim 32 -- vLLM's CPU attention takes 32, not 16 --, 8 experts top-2, fp32) into a
megatron model, starts a :class:`VLLMEngine` on its HF architecture, refreshes it through
:class:`WeightSync` in small buckets, and measures vLLM's sampled-token log-probs against megatron's
teacher-forced log-probs of the same tokens: at start, after optimizer steps on the megatron model
without and with a refresh, after perturbing one expert (a partial refresh without it must raise and keep
the disagreement), plus sampling filters, greedy, stop ids, the padded-vocabulary mask and seeding.
Every check returns plain numbers; the test asserts on them.

Shape legend: B sequences, T response tokens.
"""

from __future__ import annotations

import time

import torch

CONFIG = "examples/configs/tiny_cpu.yaml"
POLICY = "checkpoints/tiny_policy"
SEQ = 64  # room for prompts of up to 24 tokens and 32 new ones (the recipe's 16 fits digit-sum only)


def _prompts(n: int, seed: int, lo: int = 3, hi: int = 24) -> list[list[int]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g, device="cpu").tolist()
    return [torch.randint(3, 100, (k,), generator=g, device="cpu").tolist() for k in lens]


def _diff(r, tf_logp_BT) -> dict:
    m = r.response_mask_BT > 0
    d = (tf_logp_BT - r.logp_BT)[m].abs()
    return {"max": d.max().item(), "mean": d.mean().item(), "tokens": int(m.sum())}


def build(overrides=()):
    from megatron_vp2o.checkpoint import load_model
    from megatron_vp2o.config import load_config
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.model import build_gpt, transformer_config

    cfg = load_config(CONFIG, [f"model.seq_length={SEQ}", *overrides])
    init_parallel(cfg)
    model = build_gpt(cfg.model, transformer_config(cfg.model, cfg.parallel))
    load_model(POLICY, [model])
    return cfg, model


def checks(payload) -> dict:
    from megatron_vp2o.generation import SamplingConfig
    from megatron_vp2o.generation.megatron_engine import MegatronEngine, teacher_forced_logprobs
    from megatron_vp2o.generation.vllm_engine import VLLMConfig, VLLMEngine, mismatch
    from megatron_vp2o.generation.weight_sync import WeightSync, WeightSyncError

    torch.set_num_threads(2)
    cfg, model = build()
    out: dict = {"head_dim": cfg.model.hidden_size // cfg.model.num_attention_heads}
    t0 = time.perf_counter()
    rng = torch.get_rng_state()
    engine = VLLMEngine(cfg.model, pad_id=0, vocab_size=cfg.model.vocab_size,
                        config=VLLMConfig(kv_cache_bytes=64 << 20))
    out["engine_start_s"] = time.perf_counter() - t0
    out["start_keeps_rng_and_threads"] = torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == 2
    sync = WeightSync(engine, [model], cfg, bucket_bytes=1 << 20)  # ~7 MiB of fp32 weights: several buckets
    first = sync()
    out["sync"] = first
    out["num_hf_tensors"] = len(sync.expected)

    def measure(sampling, prompts):
        r = engine.generate(prompts, sampling)
        with torch.no_grad():
            tf = teacher_forced_logprobs(model, r)
        return r, tf

    prompts = _prompts(32, 0)
    base = SamplingConfig(temperature=1.0, max_new_tokens=32, seed=3)
    r, tf = measure(base, prompts)
    out["initial"] = _diff(r, tf.logp_BT)
    out["initial_mismatch"] = mismatch(r.logp_BT, tf.logp_BT, r.response_mask_BT)
    out["layout"] = {"prompt_shape": tuple(r.prompt_ids_BP.shape), "response_shape": tuple(r.response_ids_BT.shape),
                     "positions_shape": tuple(r.positions_BS.shape), "routing_shape": tuple(r.topk_idx_LBSK.shape),
                     "finish": sorted(set(r.finish_reason)),
                     "lens_ok": r.prompt_lens_B.tolist() == [len(p) for p in prompts],
                     "sequences_ok": all(s[:len(p)] == p for s, p in zip(r.sequences(), prompts))}

    # seeding: the same seed repeats exactly, another seed does not; the trainer's RNG is untouched
    state = torch.get_rng_state()
    again = engine.generate(prompts, base)
    other = engine.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=32, seed=4))
    out["seed_repeats"] = (torch.equal(again.response_ids_BT, r.response_ids_BT)
                           and torch.equal(again.logp_BT, r.logp_BT))
    out["seed_differs"] = not torch.equal(other.response_ids_BT, r.response_ids_BT)
    out["rng_untouched"] = torch.equal(state, torch.get_rng_state())

    # sampling filters map one to one (log-probs of the filtered, tempered distribution)
    filt = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=16, seed=5)
    r_f, tf_f = measure(filt, prompts)
    out["filtered"] = _diff(r_f, tf_f.logp_BT)
    g = SamplingConfig(temperature=0.0, max_new_tokens=16)
    r_g, tf_g = measure(g, prompts)
    out["greedy"] = _diff(r_g, tf_g.logp_BT)
    ours = MegatronEngine(model, pad_id=0, vocab_size=cfg.model.vocab_size).generate(prompts, g)
    out["greedy_same_tokens"] = (ours.response_ids_BT == r_g.response_ids_BT).float().mean().item()

    # stop ids: the most frequent response tokens of the first batch end sequences early
    counts = torch.bincount(r.response_ids_BT[r.response_mask_BT > 0].flatten(), minlength=cfg.model.vocab_size)
    stop = tuple(counts.topk(3).indices.tolist())
    r_s, tf_s = measure(SamplingConfig(temperature=1.0, max_new_tokens=32, seed=3, stop_token_ids=stop), prompts)
    ok = []
    for b in range(len(prompts)):
        n = int(r_s.response_mask_BT[b].sum())
        toks = r_s.response_ids_BT[b].tolist()
        stopped = r_s.finish_reason[b] == "stop"
        ok.append((not stopped or toks[n - 1] in stop) and all(t not in stop for t in toks[:n - 1])
                  and all(t == 0 for t in toks[n:]) and (stopped or n == 32))
    out["stop"] = {"rows_ok": all(ok), "stopped": sum(f == "stop" for f in r_s.finish_reason),
                   **_diff(r_s, tf_s.logp_BT)}

    # padded vocabulary: only ids < vocab_size are sampled, and log-probs use the masked distribution
    engine.vocab_size = 100
    r_v = engine.generate(prompts, base)
    engine.vocab_size = cfg.model.vocab_size
    with torch.no_grad():
        tf_v = teacher_forced_logprobs(model, r_v)
    out["vocab"] = {"max_id": int(r_v.response_ids_BT.max()), **_diff(r_v, tf_v.logp_BT)}

    # a few optimizer steps on the megatron model: the stale engine disagrees, a refresh restores agreement
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(3):
        batch = engine.generate(_prompts(16, 10 + step), SamplingConfig(max_new_tokens=16, seed=step))
        tf_b = teacher_forced_logprobs(model, batch)
        loss = -(tf_b.logp_BT * batch.response_mask_BT).sum() / batch.response_mask_BT.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    r, tf = measure(base, prompts)
    out["stale_after_steps"] = _diff(r, tf.logp_BT)
    out["refresh"] = sync()
    r, tf = measure(base, prompts)
    out["after_refresh"] = _diff(r, tf.logp_BT)
    out["after_refresh_mismatch"] = mismatch(r.logp_BT, tf.logp_BT, r.response_mask_BT)

    # one expert perturbed: a refresh that leaves it out raises and keeps the disagreement; a full one agrees
    name = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[name].add_(torch.randn(params[name].shape, generator=torch.Generator(device="cpu").manual_seed(0),
                                      device="cpu") * 0.5)
    hf_expert = (f"model.layers.1.block_sparse_moe.experts.3.{sync.arch.gate}.weight",
                 f"model.layers.1.block_sparse_moe.experts.3.{sync.arch.up}.weight")
    partial = ((n, t) for n, t in sync.tensors() if n not in hf_expert)
    try:
        sync(partial)
        out["partial_raised"] = False
    except WeightSyncError as exc:
        out["partial_raised"] = "missing" in str(exc)
    r, tf = measure(base, prompts)
    out["partial"] = _diff(r, tf.logp_BT)
    sync()
    r, tf = measure(base, prompts)
    out["expert_full"] = _diff(r, tf.logp_BT)
    out["weight_version"] = engine.weight_version

    # the RL loop's engine: refresh + vLLM + learner forward (behaviour log-probs and routing)
    from megatron_vp2o.generation.vllm_engine import SyncedEngine, truncated_is_weight

    synced = SyncedEngine(engine, sync, model)
    r = synced.generate(prompts, base)
    with torch.no_grad():
        tf = teacher_forced_logprobs(model, r)
    w = truncated_is_weight(synced.last_engine_logp_BT, r.logp_BT, 2.0)
    out["synced"] = {"behaviour_is_learner": (r.logp_BT - tf.logp_BT).abs().max().item(),
                     "routing_layers": r.topk_idx_LBSK.shape[0], "moe_layers": r.moe_layers,
                     "metrics": synced.last_metrics, "is_weight_range": (w.min().item(), w.max().item()),
                     **_diff(r, synced.last_engine_logp_BT)}
    engine.close()
    return out


def data_parallel(payload) -> dict:
    """Two data-parallel ranks, one engine each (colocated): every rank refreshes its own engine and samples
    its own prompts; its log-probs match its learner's, and the ranks' samples differ (seed offset per rank)."""
    import torch.distributed as dist

    from megatron_vp2o.generation import SamplingConfig
    from megatron_vp2o.generation.megatron_engine import teacher_forced_logprobs
    from megatron_vp2o.generation.vllm_engine import VLLMConfig, VLLMEngine
    from megatron_vp2o.generation.weight_sync import WeightSync

    torch.set_num_threads(1)
    cfg, model = build()
    engine = VLLMEngine(cfg.model, pad_id=0, vocab_size=cfg.model.vocab_size,
                        config=VLLMConfig(kv_cache_bytes=32 << 20))
    WeightSync(engine, [model], cfg)()
    prompts = _prompts(8, 0)  # the same prompts on both ranks: the samples must still differ
    r = engine.generate(prompts, SamplingConfig(max_new_tokens=16, seed=3))
    with torch.no_grad():
        tf = teacher_forced_logprobs(model, r)
    d = _diff(r, tf.logp_BT)
    stats = torch.tensor([d["max"], float(engine.dp_rank)], dtype=torch.float64, device="cpu")
    parts = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stats)
    toks = [torch.zeros_like(r.response_ids_BT) for _ in range(dist.get_world_size())]
    dist.all_gather(toks, r.response_ids_BT.contiguous())
    engine.close()
    return {"max_diff": max(p[0].item() for p in parts), "dp_ranks": sorted(int(p[1].item()) for p in parts),
            "samples_differ": not torch.equal(toks[0], toks[1])}


def engine_group(payload) -> dict:
    """Two data-parallel ranks sharing one engine (``rl.vllm.tp=2``: tensor parallel over both ranks through
    vLLM's external_launcher, gloo). Each rank sends its own prompts and gets rollouts of exactly those
    prompts; their log-probs match its learner's teacher-forced ones, greedy and sampled, before and after
    the learner's weights change and a refresh pushes them into both shards; a stale engine disagrees."""
    import torch.distributed as dist

    from megatron_vp2o.generation import SamplingConfig
    from megatron_vp2o.generation.megatron_engine import teacher_forced_logprobs
    from megatron_vp2o.generation.vllm_engine import VLLMConfig, VLLMEngine
    from megatron_vp2o.generation.weight_sync import WeightSync

    torch.set_num_threads(1)
    cfg, model = build()
    rank = dist.get_rank()
    engine = VLLMEngine(cfg.model, pad_id=0, vocab_size=cfg.model.vocab_size,
                        config=VLLMConfig(tp=2, kv_cache_bytes=32 << 20))
    sync = WeightSync(engine, [model], cfg)
    sync()
    prompts = _prompts(6 + 2 * rank, 10 + rank)  # different prompts, different counts per rank

    def run(sampling):
        r = engine.generate(prompts, sampling)
        with torch.no_grad():
            tf = teacher_forced_logprobs(model, r)
        real = [row[row.shape[0] - int(n):].tolist() for row, n in zip(r.prompt_ids_BP, r.prompt_lens_B)]
        return r, {**_diff(r, tf.logp_BT), "rows": r.response_ids_BT.shape[0], "own_prompts": real == prompts}

    _, greedy = run(SamplingConfig(temperature=0.0, max_new_tokens=12))
    # each rank its own seed (as vp2o eval passes each rank its problem's): the engine's two workers must
    # still draw alike, or their tensor-parallel halves would decode different sequences
    _, sampled = run(SamplingConfig(max_new_tokens=12, seed=5 + 100 * rank))
    with torch.no_grad():  # the learner moves on (the same change on both ranks)
        for name, p in model.named_parameters():
            if "experts" in name or "linear_qkv" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), device="cpu")
                       .to(p))
    _, stale = run(SamplingConfig(temperature=0.0, max_new_tokens=12))
    sync()
    _, refreshed = run(SamplingConfig(temperature=0.0, max_new_tokens=12))
    engine.close()
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, {"greedy": greedy, "sampled": sampled, "stale": stale, "refreshed": refreshed,
                                 "engine_index": engine.dp_rank, "prompts": len(prompts)})
    return got

"""Decoding throughput of the megatron rollout engine: KV cache vs none, and vs HF ``generate``.

What: greedy decoding tokens/s (new tokens only, batch B) of :class:`MegatronEngine` with megatron's
``StaticInferenceContext`` KV cache, the same engine re-running the full sequence every step
(``use_cache=False``), and Hugging Face ``Qwen3MoeForCausalLM.generate`` (KV cache) on a model of the
same shape (random weights: E experts, top-k K, width D, qk-norm, GQA), at prompt lengths 16/128/512,
in two configurations: fp32 with megatron's SequentialMLP experts (one module call per expert; the
CPU default) and bf16 with megatron's GroupedMLP (one grouped GEMM per projection, as TEGroupedMLP on
GPU, and as HF's own ``grouped_mm`` experts), each against HF in the same dtype.
Why: rollouts dominate an RL step's wall time; the goal is to be no slower than HF on the same model.
The megatron engine also logs per-layer routing (a forward hook) and behaviour log-probs, which HF
does not, so the comparison is conservative. CPU only here; on GPU the numbers differ in kind.

``--vllm`` (run it with vLLM installed: ``.venv-vllm/bin/python bench/bench_rollout.py --vllm --threads 2``,
see ``make test-vllm``) measures the vLLM engine against the megatron engine instead, issue 20's shape:
random Qwen3-MoE-shaped weights (4 layers, hidden 128, head_dim 32, 8 experts top-2, qk-norm, fp32) built in
megatron and pushed into vLLM by the weight refresh, batch 64, prompts of 128 tokens with 128 sampled
tokens and 512 with 512 (temperature 1, no stop ids: every sequence runs to the end), the same threads;
tokens/s counts new tokens.

Usage: python bench/bench_rollout.py [--quick] [--threads N] [--vllm]   (--quick finishes in < 60 s)

Shape legend: B sequences, P prompt length, T new tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, num_experts=8,
             moe_router_topk=2, moe_ffn_hidden_size=64, ffn_hidden_size=128, vocab_size=128, seq_length=1024,
             qk_layernorm=True, router=dict(aux_loss_type="none"))


def megatron_model(**overrides):
    from megatron.core import parallel_state as ps

    from megatron_vp2o.config import Config, build
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.model import build_gpt, transformer_config

    cfg = build(Config, {"model": dict(SHAPE, **overrides), "train": {"seed": 0}})
    if not ps.model_parallel_is_initialized():
        init_parallel(cfg)
    model = build_gpt(cfg.model, transformer_config(cfg.model, cfg.parallel))
    return model.eval()


def hf_model(dtype=torch.float32):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    s = SHAPE
    conf = Qwen3MoeConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["ffn_hidden_size"],
                          moe_intermediate_size=s["moe_ffn_hidden_size"], num_hidden_layers=s["num_layers"],
                          num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_query_groups"],
                          head_dim=s["hidden_size"] // s["num_attention_heads"], num_experts=s["num_experts"],
                          num_experts_per_tok=s["moe_router_topk"], norm_topk_prob=True, max_position_embeddings=2048,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(conf).eval().to(dtype)


def prompts_BP(b: int, p: int) -> torch.Tensor:
    return torch.randint(3, 100, (b, p), generator=torch.Generator().manual_seed(p))


def time_megatron(model, ids_BP, t: int, use_cache: bool) -> float:
    from megatron_vp2o.generation import MegatronEngine, SamplingConfig

    eng = MegatronEngine(model, pad_id=0, vocab_size=SHAPE["vocab_size"], use_cache=use_cache)
    t0 = time.perf_counter()
    r = eng.generate(ids_BP.tolist(), SamplingConfig(temperature=0.0, max_new_tokens=t))
    return r.response_ids_BT.numel() / (time.perf_counter() - t0)


def time_hf(model, ids_BP, t: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids_BP, attention_mask=torch.ones_like(ids_BP), max_new_tokens=t, min_new_tokens=t,
                             do_sample=False, pad_token_id=0)
    return (out.shape[1] - ids_BP.shape[1]) * ids_BP.shape[0] / (time.perf_counter() - t0)


VLLM_SHAPE = dict(SHAPE, num_layers=4, hidden_size=128, moe_ffn_hidden_size=128, ffn_hidden_size=256, seq_length=1024)


def vllm_column(threads: int, batch: int = 64, shapes=((128, 128), (512, 512))) -> dict:
    """tokens/s of the megatron engine and the vLLM engine on the same weights (see the module doc)."""
    from megatron.core import parallel_state as ps

    from megatron_vp2o.config import Config, build
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.generation import MegatronEngine, SamplingConfig
    from megatron_vp2o.generation.vllm_engine import VLLMConfig, VLLMEngine
    from megatron_vp2o.generation.weight_sync import WeightSync
    from megatron_vp2o.model import build_gpt, transformer_config

    cfg = build(Config, {"model": VLLM_SHAPE, "train": {"seed": 0}})
    if not ps.model_parallel_is_initialized():
        init_parallel(cfg)
    model = build_gpt(cfg.model, transformer_config(cfg.model, cfg.parallel)).eval()
    vocab = VLLM_SHAPE["vocab_size"]
    engines = {"megatron": MegatronEngine(model, pad_id=0, vocab_size=vocab),
               "vllm": VLLMEngine(cfg.model, pad_id=0, vocab_size=vocab, config=VLLMConfig(max_num_seqs=batch))}
    sync = WeightSync(engines["vllm"], [model], cfg)()
    torch.set_num_threads(threads)
    print(f"\nvLLM vs megatron engine: batch {batch}, fp32, temperature 1, {threads} thread(s), weights pushed in "
          f"{sync['timing/weight_sync']:.2f} s; new tokens/s")
    print(f"{'prompt':>6} | {'new':>4} | {'megatron':>9} | {'vLLM':>9} | {'vLLM/megatron':>13}")
    out = {}
    for p, t in shapes:
        ids = prompts_BP(batch, p).tolist()
        tps = {}
        for name, eng in engines.items():
            eng.generate(ids[:4], SamplingConfig(max_new_tokens=4, seed=1))  # warm-up at this prompt length
            runs = []
            for rep in range(1 if (name == "megatron" and p >= 512) else 2):
                t0 = time.perf_counter()
                r = eng.generate(ids, SamplingConfig(max_new_tokens=t, seed=rep))
                runs.append(float(r.response_mask_BT.sum()) / (time.perf_counter() - t0))
            tps[name] = max(runs)
        out[(p, t)] = tps
        ratio = tps["vllm"] / tps["megatron"]
        print(f"{p:>6} | {t:>4} | {tps['megatron']:>9.0f} | {tps['vllm']:>9.0f} | {ratio:>13.2f}", flush=True)
    engines["vllm"].close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens, best of two (< 60 s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vllm", action="store_true", help="vLLM engine vs megatron engine (needs vLLM)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.vllm:
        from megatron_vp2o import platform

        platform.activate()
        vllm_column(args.threads)
        from megatron_vp2o.distributed.init import shutdown

        shutdown()
        return
    t_new, repeats = (16, 2) if args.quick else (64, 3)
    variants = [("fp32, megatron SequentialMLP (expert_impl=sequential, the CPU default)", {}, torch.float32),
                ("bf16, megatron GroupedMLP (expert_impl=grouped: one grouped GEMM per projection, the "
                 "layout of TEGroupedMLP on GPU)", dict(params_dtype="bf16", expert_impl="grouped"), torch.bfloat16)]
    worst = {}
    for title, overrides, dtype in variants:
        mg, hf = megatron_model(**overrides), hf_model(dtype)
        time_megatron(mg, prompts_BP(2, 8), 4, True)  # warm-up (lazy imports, allocator)
        time_hf(hf, prompts_BP(2, 8), 4)
        print(f"\n{title}; HF Qwen3MoeForCausalLM in {str(dtype)[6:]}")
        print(f"greedy decoding, batch {args.batch}, {t_new} new tokens, {args.threads} thread(s); tokens/s "
              f"(best of {repeats})")
        print(f"{'prompt':>6} | {'megatron+cache':>14} | {'megatron no cache':>17} | {'HF generate':>11} | "
              f"{'cache/no-cache':>14} | {'megatron/HF':>11}")
        ratios = []
        for p in (16, 128, 512):
            ids_BP = prompts_BP(args.batch, p)
            # untimed pass at these shapes: megatron's jit_fuser (torch.compile) specialises on them
            time_megatron(mg, ids_BP, 2, True), time_megatron(mg, ids_BP, 2, False), time_hf(hf, ids_BP, 2)
            cached = max(time_megatron(mg, ids_BP, t_new, True) for _ in range(repeats))
            nocache = max(time_megatron(mg, ids_BP, t_new, False) for _ in range(1 if p == 512 else repeats))
            hf_tps = max(time_hf(hf, ids_BP, t_new) for _ in range(repeats))
            ratios.append(cached / hf_tps)
            print(f"{p:>6} | {cached:>14.0f} | {nocache:>17.0f} | {hf_tps:>11.0f} | {cached / nocache:>14.2f} | "
                  f"{cached / hf_tps:>11.2f}", flush=True)
        worst[str(dtype)[6:]] = min(ratios)
    print("\nmegatron/HF, worst prompt length: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    from megatron_vp2o.distributed.init import shutdown

    shutdown()


if __name__ == "__main__":
    main()

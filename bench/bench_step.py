"""Time a VP2O learner step against a GRPO learner step on the same model and batch.

What: one process builds the tiny MoE GPT twice from the same weights -- megatron's MoELayer for
the GRPO learner step (what `vp2o train` runs for ``rl.algo=grpo``: `training.step.train_step` with
the clipped policy loss of `rl.learner.policy_forward_step` and the `grads_finite` guard) and
`VP2OMoELayer` for the VP2O learner step (`rl.learner.vp2o.vp2o_train_step` with the same policy
loss and guard, plus Stein transport, repulsion, specialisation losses, freeze of inactive experts,
prototype refresh, trust region with an anchor) -- and times ``--steps`` pairs of steps on the same
RL micro-batches (prompt + response columns, behaviour log-probs, advantages) after one warm-up
step each, alternating GRPO and VP2O so that drifting load on a shared machine hits both; the
ratio is the median of the per-pair ratios. ``--plain`` times a plain LM step (no policy loss,
no guard) as the baseline instead, as earlier versions of this bench did. ``--threads 1`` (one
intra-op thread) is the steadiest on a 2-core box. Prints a phase table, the neighbour-exchange bytes against
the local expert-gradient bytes (measured at EP=1, and what the static exchange would move at
EP=2/4 for this step's neighbour sets), and ends with ``ratio vp2o/grpo <value>``.

Usage: ``python bench/bench_step.py [--quick] [--full | --wide] [--steps N] [--threads T] [--batch B --micro M]``

``--wide`` is a compute-bound variant (D = F = 512, 2 layers, 32 x 128 tokens in 4 micro-batches):
at the tiny width most of a step is per-op overhead (matmuls are ~1/3 of the plain step), so
VP2O's extra small ops weigh more than they would on a model whose expert matmuls dominate, as
at 33B; the wide row shows the ratio in that regime.
(--quick: under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


# The CPU bench model: the tiny recipe's MoE (examples/configs/tiny_cpu.yaml: D=128, 4 layers, E=8, K=2,
# F=128) on an RL-sized batch (16 sequences x 64 tokens in 2 micro-batches); --full doubles the width.
BENCH_MODEL = dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2, num_experts=8,
                   moe_router_topk=2, moe_ffn_hidden_size=128, ffn_hidden_size=256, vocab_size=128, seq_length=64)
BATCH, MICRO = 16, 8
PROMPT_LEN = 16  # RL batches: 16 prompt columns, the rest response (the policy loss's columns)


WIDE = dict(hidden_size=512, moe_ffn_hidden_size=512, ffn_hidden_size=1024, num_layers=2, seq_length=128)


def build(full: bool, batch: int = BATCH, micro: int = MICRO, wide: bool = False, trust_region=None):
    from megatron_vp2o.config import Config, build as build_cfg
    from megatron_vp2o.data.sft import SFTBatch
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.moe import vp2o_moe_layer
    from megatron_vp2o.training.setup import build_trainable
    from megatron_vp2o.rl.learner.vp2o import init_vp2o

    model = dict(BENCH_MODEL, **(dict(hidden_size=256, moe_ffn_hidden_size=256) if full else {}), **(WIDE if wide else {}))
    cfg = build_cfg(Config, {
        "model": model, "train": dict(micro_batch_size=micro, global_batch_size=batch, lr=1e-3, warmup_steps=0),
        "vp2o": dict(stein=dict(repulsion_coef=0.01), specialization=dict(ortho_coef=1e-4, var_coef=1e-3),
                     trust_region=dict(anchor_delta=2.0, **(trust_region or {})))})
    init_parallel(cfg)
    vp2o = build_trainable(cfg, moe_layer_cls=vp2o_moe_layer(cfg.vp2o.specialization))
    plain = build_trainable(cfg)
    plain.module.load_state_dict(vp2o.module.state_dict(), strict=False)
    plain.optimizer.reload_model_params()
    state = init_vp2o(vp2o, cfg.vp2o, False)
    ids = torch.randint(3, 100, (batch, model["seq_length"] + 1), generator=torch.Generator().manual_seed(0))
    mbs = [SFTBatch(c[:, :-1], c[:, 1:], torch.ones(c.shape[0], c.shape[1] - 1)) for c in ids.split(micro)]
    return plain, vp2o, state, mbs, cfg


def rl_batches(ids_BS1: torch.Tensor, micro: int, prompt_len: int = PROMPT_LEN) -> list:
    """RL micro-batches as `rl.batches.make_batches` builds them: loss on the response columns,
    behaviour log-probs near a uniform policy's, one advantage per sequence (zero-mean groups)."""
    from megatron_vp2o.rl.batches import RLBatch
    from megatron_vp2o.generation.rollouts import attention_mask

    b, s = ids_BS1.shape[0], ids_BS1.shape[1] - 1
    gen = torch.Generator().manual_seed(1)
    loss_mask = torch.zeros(b, s)
    loss_mask[:, prompt_len - 1:] = 1.0
    logp_old = (-torch.log(torch.tensor(float(BENCH_MODEL["vocab_size"]))) + 0.1 * torch.randn(b, s, generator=gen))
    adv = torch.randn(b, generator=gen)
    adv = adv - adv.mean()
    pos = torch.arange(s).expand(b, s)
    mask = attention_mask(torch.zeros(b, dtype=torch.long), s, s)
    return [RLBatch(ids_BS1[i, :-1], ids_BS1[i, 1:], pos[i], mask[i], loss_mask[i], logp_old[i] * loss_mask[i], adv[i])
            for i in torch.arange(b).split(micro)]


def interleaved(plain_fn, vp2o_fn, steps: int) -> tuple[list[dict], list[dict], list[float]]:
    """Alternate plain and VP2O steps (one warm-up each): both see the same machine state, so
    drifting load on a shared CPU cancels in the per-pair ratios. Returns both runs' metrics
    with wall times, and the per-pair ratios."""
    plain_fn(), vp2o_fn()
    plain, ours, ratios = [], [], []
    for _ in range(steps):
        for fn, out in ((plain_fn, plain), (vp2o_fn, ours)):
            sync()
            t0 = time.perf_counter()
            m = fn()
            sync()
            out.append(dict(m, wall=time.perf_counter() - t0))
        ratios.append(ours[-1]["wall"] / plain[-1]["wall"])
    return plain, ours, ratios


def sync() -> None:
    """Wait for queued GPU work, so a wall time covers the step's kernels (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in runs)


def exchange_table(state, row_bytes: int) -> list[str]:
    from megatron_vp2o.distributed.stein_hook import layer_masks, requested_rows

    lines = []
    for layer in state.layers:
        masks = layer_masks(layer.counts_EE, layer.protos_ED, float(layer.counts_EE.diagonal().sum()) / layer.top_k,
                            state.cfg.stein, layer.top_k)
        idx_EM1, num_experts = masks[4], layer.counts_EE.shape[0]
        for ep in (2, 4):
            local = num_experts // ep
            need_RE = requested_rows(idx_EM1, ep)
            for r in range(ep):
                need_RE[r, r * local:(r + 1) * local] = False
            needed = float(need_RE.sum(1).float().mean()) * row_bytes
            lines.append(f"| layer {layer.layer_number} EP={ep} | {(ep - 1) * local * row_bytes:>10d} | "
                         f"{needed:>10.0f} | {local * row_bytes:>10d} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed step pairs (under a minute)")
    parser.add_argument("--full", action="store_true", help="the bench model at twice the width")
    parser.add_argument("--wide", action="store_true", help="compute-bound variant: D=F=512, 2 layers, 32 x 128 tokens")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=BATCH, help="sequences per step")
    parser.add_argument("--micro", type=int, default=MICRO, help="sequences per micro-batch")
    parser.add_argument("--anchor-gates", default="post_step", choices=("post_step", "pre_step"),
                        help="vp2o.trust_region.anchor_gates of the VP2O step")
    parser.add_argument("--anchor-micro-batches", type=int, default=0,
                        help="vp2o.trust_region.anchor_micro_batches (0: all of the step's)")
    parser.add_argument("--plain", action="store_true", help="baseline: a plain LM step (no policy loss, no guard)")
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    from functools import partial

    from megatron_vp2o.rl.learner import grads_finite, policy_forward_step
    from megatron_vp2o.training.step import lm_forward_step, train_step
    from megatron_vp2o.rl.learner.vp2o import capture_anchors, vp2o_train_step

    if args.wide and (args.batch, args.micro) == (BATCH, MICRO):
        args.batch, args.micro = 32, 8
    plain, vp2o, state, mbs, cfg = build(args.full, args.batch, args.micro, args.wide,
        trust_region=dict(anchor_gates=args.anchor_gates, anchor_micro_batches=args.anchor_micro_batches))
    if args.plain:
        fwd, guard, keys, label = lm_forward_step, None, (), "plain megatron LM step"
    else:
        ids_BS1 = torch.cat([torch.cat([m.tokens, m.labels[:, -1:]], 1) for m in mbs])  # the same token ids
        mbs = rl_batches(ids_BS1, args.micro)
        fwd = partial(policy_forward_step, cfg=cfg.rl, vocab_size=BENCH_MODEL["vocab_size"])
        guard, keys, label = grads_finite, ("clip_frac", "ratio_mean", "kl_ref"), "grpo learner step"
    anchors = capture_anchors(vp2o, mbs, state, forward_step=fwd)
    p_runs, v_runs, ratios = interleaved(
        lambda: train_step(plain, mbs, fwd, guard=guard, report_keys=keys),
        lambda: vp2o_train_step(vp2o, mbs, state, forward_step=fwd, anchors=anchors, guard=guard), steps)
    print(f"| phase (median of {steps} interleaved steps, seconds) | {label} | vp2o |")
    print("|---|---|---|")
    for phase in ("forward_backward", "stein", "optimizer", "trust_region"):
        print(f"| {phase} | {median_of(p_runs, 'timing/' + phase):.4f} | {median_of(v_runs, 'timing/' + phase):.4f} |")
    print(f"| whole step | {median_of(p_runs, 'wall'):.4f} | {median_of(v_runs, 'wall'):.4f} |")
    print(f"\nvp2o decisions: {sorted({r['decision'] for r in v_runs})}; per-pair ratio spread "
          f"{min(ratios):.3f} .. {max(ratios):.3f}")
    m = v_runs[-1]
    row_bytes = m["exchange/local_grad_bytes/layer1"] // vp2o.module.decoder.layers[0].mlp.num_local_experts
    print("\n| neighbour exchange (bytes per rank) | moved (static) | needed rows | local expert grads |")
    print("|---|---|---|---|")
    print(f"| layer 1 EP=1 (measured) | {m['exchange/bytes_moved/layer1']:>10.0f} | "
          f"{m['exchange/bytes_needed/layer1']:>10.0f} | {m['exchange/local_grad_bytes/layer1']:>10.0f} |")
    print("\n".join(exchange_table(state, int(row_bytes))))
    tokens = sum(m.tokens.numel() for m in mbs)
    for name, runs in (("grpo", p_runs), ("vp2o", v_runs)):
        print(mfu_line(name, vp2o.module, cfg, tokens, median_of(runs, "wall")))
    print(f"ratio vp2o/grpo {statistics.median(ratios):.3f}")


# Dense peak throughput (FLOP/s) by device name and dtype: bf16 tensor cores, fp32 through TF32.
PEAK_FLOPS = {"H100": {"bf16": 989e12, "fp32": 495e12}, "H200": {"bf16": 989e12, "fp32": 495e12},
              "A100": {"bf16": 312e12, "fp32": 156e12}}


def model_flops_per_step(module, cfg, tokens: int) -> float:
    """6 x active parameters x tokens (forward + backward; each token meets the dense weights and K of
    E experts) + causal attention scores and values, 6 x L x S x D x tokens (half of 12 for causality)."""
    experts = sum(p.numel() for n, p in module.named_parameters() if ".experts." in n)
    dense = sum(p.numel() for n, p in module.named_parameters() if ".experts." not in n)
    m = cfg.model
    active = dense + experts * m.moe_router_topk / m.num_experts
    return 6.0 * active * tokens + 6.0 * m.num_layers * m.seq_length * m.hidden_size * tokens


def mfu_line(name: str, module, cfg, tokens: int, seconds: float) -> str:
    """Model FLOP utilisation of a step that took ``seconds`` (on CUDA; the CPU has no peak here)."""
    flops = model_flops_per_step(module, cfg, tokens)
    if not torch.cuda.is_available():
        return f"mfu {name}: n/a on CPU ({flops / seconds / 1e9:.2f} GFLOP/s achieved)"
    dtype = "bf16" if cfg.model.params_dtype == "bf16" else "fp32"
    device = torch.cuda.get_device_name()
    peak = next((v[dtype] for k, v in PEAK_FLOPS.items() if k in device), None)
    achieved = flops / seconds
    if peak is None:
        return f"mfu {name}: unknown peak for {device} ({achieved / 1e12:.2f} TFLOP/s achieved)"
    return f"mfu {name} {achieved / peak:.4f} ({achieved / 1e12:.2f} of {peak / 1e12:.0f} TFLOP/s {dtype}, {device})"


if __name__ == "__main__":
    main()

"""CPU micro-benchmark of the VP2O algorithm core (megatron_vp2o.algo), one table per sweep.

What: wall time of each op against the number of experts E, the model width D and the expert
size F (fc2 weight [D, F]; P = D * F flattened params per expert), plus the attraction scaling
table at a fixed layer size E * P: the sparse gather-and-mix costs O((m + 1) E P), flat in E and
linear in m + 1, while a dense E x E mix costs O(E * E P) and grows with E.
Why: the Stein machinery must stay a small fraction of a training step (the paper reports 5-8% at
33B scale); this shows which op dominates and how each scales. CPU only; on GPU the same ops are
bandwidth-bound mat-vecs and gathers.

Usage: python bench/bench_algo.py [--quick] [--threads N]   (--quick finishes in < 60 s;
one thread by default, since spinning thread pools distort timings on a shared machine)

Shape legend: E experts, D hidden, F expert ffn, P = D * F params per expert, T tokens, K top-k,
M neighbours (m = coact_topm); method §2.4-2.10 for the ops.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_vp2o.algo import coactivation, kernels, prototypes, specialization  # noqa: E402
from megatron_vp2o.algo import stein, trust_region  # noqa: E402

OPS = ("power_iter", "kernel", "coact+masks", "attraction", "repulsion", "ortho_loss", "anchor")


def timeit(fn, repeats: int) -> float:
    """Best-of-``repeats`` wall time in ms after two warm-ups (best-of resists CPU contention)."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def layer_inputs(num_experts: int, dim: int, ffn: int, num_tokens: int, top_k: int) -> dict:
    """Random inputs of one MoE layer with the given sizes."""
    weight_EDF = torch.randn(num_experts, dim, ffn) / ffn**0.5
    protos_ED = prototypes.normalize(torch.randn(num_experts, dim))
    topk_TK = torch.topk(torch.rand(num_tokens, num_experts), top_k, dim=-1).indices
    counts_EE = coactivation.coactivation_counts(topk_TK, num_experts)
    coact_EE = coactivation.coactivation_matrix(counts_EE, num_tokens)
    coactive_EE, inactive_EE = coactivation.neighbour_masks(coact_EE, top_k)
    return dict(
        weight=weight_EDF, protos=protos_ED, topk=topk_TK, coact=coact_EE, coactive=coactive_EE,
        inactive=inactive_EE, kernel=kernels.prototype_kernel(protos_ED, 1.0),
        grads=torch.randn(num_experts, dim * ffn), gates=torch.rand(num_tokens, top_k),
        out=torch.randn(num_tokens, top_k, dim),
    )


def op_times(num_experts, dim, ffn, num_tokens, top_k, repeats) -> dict:
    """ms per op for one layer of the given size."""
    x = layer_inputs(num_experts, dim, ffn, num_tokens, top_k)
    calls = {
        "power_iter": lambda: prototypes.power_iteration(x["weight"], x["protos"], 2),
        "kernel": lambda: kernels.prototype_kernel(x["protos"], 1.0),
        "coact+masks": lambda: coactivation.neighbour_masks(coactivation.coactivation_matrix(
            coactivation.coactivation_counts(x["topk"], num_experts), num_tokens), top_k),
        "attraction": lambda: stein.attraction(x["grads"], x["kernel"], x["coactive"], top_k),
        "repulsion": lambda: stein.repulsion_grad(x["weight"], x["protos"], x["inactive"], 1.0),
        "ortho_loss": lambda: specialization.orthogonality_loss(x["out"]),
        "anchor": lambda: trust_region.anchor_distance(
            x["topk"], x["gates"], x["protos"], x["topk"], x["gates"], x["protos"]),
    }
    return {name: timeit(fn, repeats) for name, fn in calls.items()}


def print_table(title: str, key: str, rows: list) -> None:
    print(f"\n{title}")
    print(f"| {key:>6} | " + " | ".join(f"{op:>11}" for op in OPS) + " |")
    print("|" + "-------:|" + "------------:|" * len(OPS))
    for value, times in rows:
        print(f"| {value:>6} | " + " | ".join(f"{times[op]:>11.2f}" for op in OPS) + " |")


def sweep(args, key: str, values, base: dict) -> None:
    rows = []
    for value in values:
        sizes = dict(base, **{key: value})
        rows.append((value, op_times(sizes["E"], sizes["D"], sizes["F"], args.tokens,
                                     min(args.top_k, sizes["E"] - 1), args.repeats)))
    fixed = ", ".join(f"{k}={v}" for k, v in base.items() if k != key)
    print_table(f"ms per op vs {key} ({fixed}, T={args.tokens}, K=m={args.top_k})", key, rows)


def attraction_scaling(args, experts, topms, layer_params: int) -> None:
    """Sparse (gather m + 1) vs dense (E x E matmul) attraction at a fixed layer size E * P.

    Fixing E * P (finer-grained experts as E grows) keeps the data in the same memory tier, so
    the table shows the algorithmic scaling: sparse is O(E (m+1) P) = O((m+1) E P), flat in E and
    linear in m + 1; dense is O(E^2 P) = O(E * E P), linear in E.
    """
    print(f"\nattraction: ms per layer at fixed E * P = {layer_params} "
          "(sparse = O((m+1) E P): flat in E; dense E x E = O(E * E P): grows with E)")
    print("|      E |" + "".join(f"  sparse m={m:<3}|" for m in topms) + "  dense E x E |")
    print("|-------:|" + "-------------:|" * (len(topms) + 1))
    for num_experts in experts:
        grads_EP = torch.randn(num_experts, layer_params // num_experts)
        protos_ED = prototypes.normalize(torch.randn(num_experts, 64))
        kernel_EE = kernels.prototype_kernel(protos_ED, 1.0)
        coact_EE = coactivation.coactivation_matrix(torch.rand(num_experts, num_experts), 1.0)
        cells = []
        for m in topms:
            coactive_EE, _ = coactivation.neighbour_masks(coact_EE, m)
            cells.append(timeit(lambda: stein.attraction(grads_EP, kernel_EE, coactive_EE, m),
                                args.repeats))
        dense_w_EE = torch.softmax(torch.randn(num_experts, num_experts), -1)
        cells.append(timeit(lambda: dense_w_EE @ grads_EP, args.repeats))
        print(f"| {num_experts:>6} |" + "".join(f" {c:>12.2f} |" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    args.top_k = 8
    if args.quick:
        args.tokens, args.repeats = 1024, 10
        sweep(args, "E", (8, 32, 128), dict(E=32, D=512, F=128))
        sweep(args, "D", (512, 1024, 2048, 4096), dict(E=16, D=512, F=64))
        sweep(args, "F", (64, 128, 256, 512), dict(E=16, D=512, F=128))
        attraction_scaling(args, (8, 32, 128), (1, 4, 8, 16), layer_params=1 << 21)
    else:
        args.tokens, args.repeats = 4096, 10
        sweep(args, "E", (8, 16, 32, 64, 128), dict(E=32, D=1024, F=256))
        sweep(args, "D", (512, 1024, 2048, 4096), dict(E=32, D=1024, F=256))
        sweep(args, "F", (128, 256, 512, 1024), dict(E=32, D=1024, F=256))
        attraction_scaling(args, (8, 16, 32, 64, 128), (1, 2, 4, 8, 16), layer_params=1 << 23)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

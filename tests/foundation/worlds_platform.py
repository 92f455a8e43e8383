"""World functions for test_platform.py: each CPU redirect, checked on 2 real gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _megatron_type_call(t):
    """Call Tensor.type() from a frame whose module name is megatron's (as the optimizer does)."""
    scope = {"__name__": "megatron.core.optimizer.fake", "t": t}
    exec("result = t.type()", scope)
    return scope["result"]


def redirects(payload):
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils

    from megatron_vp2o import compat

    from megatron_vp2o.distributed.init import init_process_group
    from megatron_vp2o.platform import cpu

    from megatron.core import parallel_state

    init_process_group()
    parallel_state.initialize_model_parallel()
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    out = {}
    out["1_current_device"] = torch.cuda.current_device() == torch.device("cpu")
    model_parallel_cuda_manual_seed(11)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    restored = torch.equal(torch.get_rng_state(), before)
    model_parallel_cuda_manual_seed(11)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    out["2_rng_tracker"] = restored and torch.equal(a, b) and torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda.current_stream().wait_stream(stream)
    stream.record_event().synchronize()
    torch.cuda.synchronize()
    out["3_streams"] = True
    x = torch.ones(3)
    out["4_factories"] = (torch.zeros(2, device="cuda").device.type == "cpu" and x.cuda().device.type == "cpu"
                          and x.to("cuda").device.type == "cpu" and x.to(device="cuda").device.type == "cpu")
    out["5_type_strings"] = (_megatron_type_call(x) == "torch.cuda.FloatTensor" and x.type() == "torch.FloatTensor"
                             and _megatron_type_call(x.bfloat16()) == "torch.cuda.BFloat16Tensor")
    inp, w = torch.randn(5, 8), torch.randn(4, 8)
    routed = moe_utils.router_gating_linear(inp, w, None, torch.float32)
    out["6_router_gemm"] = moe_utils.te_general_gemm is None and torch.allclose(routed, inp @ w.t())
    arr = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    out["7_split_sizes_numpy"] = type(arr).__module__ == "numpy" and arr.tolist() == [1, 2]
    sizes = [r + 1 for r in range(world)]
    mine = torch.full((sizes[rank], 2), float(rank))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    expect = torch.cat([torch.full((n, 2), float(r)) for r, n in enumerate(sizes)])
    full = torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    start = sum(sizes[:rank])
    out["8_uneven_collectives"] = torch.equal(gathered, expect) and torch.equal(scattered, world * full[start:start + sizes[rank]])
    grouped_gemm_util = compat.grouped_gemm_util()
    if grouped_gemm_util is None:  # megatron-core >= 0.19: no legacy GroupedMLP, nothing to redirect
        out["9_grouped_gemm"] = "absent"
    else:
        a_, b_ = torch.randn(7, 3), torch.randn(2, 3, 4)
        got = grouped_gemm_util.ops.gmm(a_, b_, torch.tensor([3, 4]), trans_b=False)
        out["9_grouped_gemm"] = torch.allclose(got, torch.cat([a_[:3] @ b_[0], a_[3:] @ b_[1]]))
    out["installed"] = cpu.installed()
    cpu.uninstall()
    needed = {}
    for name, call in {"1": lambda: torch.cuda.current_device(), "4": lambda: torch.zeros(1, device="cuda"),
                       "5": lambda: _megatron_type_call(x) == "torch.cuda.FloatTensor" or 1 / 0}.items():
        try:
            call()
            needed[name] = False
        except Exception:
            needed[name] = True
    cpu.install()
    out["needed_without_layer"] = needed
    out["reinstalled"] = cpu.installed() and torch.zeros(1, device="cuda").device.type == "cpu"
    return out

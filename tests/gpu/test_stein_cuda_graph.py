"""Contract: the Stein hook's tensor work (masks, kernel, attraction, repulsion mix) captures in a CUDA
graph and replays with new inputs to the same result as eager execution. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_hook_tensor_work_replays_in_cuda_graph():
    from megatron_vp2o.algo.config import SteinConfig
    from megatron_vp2o.algo.prototypes import normalize
    from megatron_vp2o.distributed.stein_hook import layer_masks, transport_rows

    cfg, dev = SteinConfig(), torch.device("cuda")
    num_experts, num_params = 16, 256

    def inputs(seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        counts = torch.randint(0, 5, (num_experts, num_experts), generator=gen).float()
        return [(counts + counts.T).to(dev), normalize(torch.randn(num_experts, 32, generator=gen)).to(dev),
                torch.randn(num_experts, num_params, generator=gen).to(dev),
                torch.randn(num_experts, 16, 2, generator=gen).to(dev), torch.randn(num_experts, 2, 16, generator=gen).to(dev)]

    def hook(counts_EE, protos_ED, grads_EP, left_EA2, right_E2C):
        active_E, _, _, _, idx_EM1, w_EM1 = layer_masks(counts_EE, protos_ED, 128.0, cfg, 2)
        ok = torch.isfinite(grads_EP).all()
        return transport_rows(grads_EP, idx_EM1, w_EM1, active_E, ok, (left_EA2, right_E2C), 0.01)[0]

    static = inputs(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            hook(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hook(*static)
    for seed in (1, 2):
        fresh = inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out, hook(*fresh), atol=1e-6)

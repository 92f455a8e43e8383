"""Contract: the VP2O MoE layer's accessor reads/writes every expert layout correctly, raw per-token
expert outputs gathered through the dispatcher equal the experts applied token by token, the
ortho path computes the same layer output, the hook's tensor work traces without graph breaks, and
the router aux loss of both RL layers (GRPO's and VP2O's) sees the response tokens only."""

from __future__ import annotations

import pytest
import torch

from harness import run_world


@pytest.fixture(scope="module")
def checks():
    return run_world(1, "moe.worlds_moe:run_all", None)


@pytest.mark.parametrize("layout", ["sequential", "grouped"])
def test_accessor_reads_and_writes_each_layout(checks, layout):
    if checks[layout] is None:
        pytest.skip("megatron-core without the legacy GroupedMLP (compat row 3)")
    got = checks[layout]
    assert got["fc2"] and got["roundtrip"] and got["fc2_flat_shape"] and got["mask"], got
    assert got["shape"] == (8, 32, 32)
    assert got["repulsion_layout"] < 1e-5, got  # the hook's in-place rank-two repulsion, in this layout
    assert got["no_grad_forward_rel_diff"] < (2e-2 if layout == "grouped" else 1e-6), got  # bf16 grouped


@pytest.mark.parametrize("algo", ["grpo", "vp2o"])
def test_router_aux_loss_sees_response_tokens_only(checks, algo):
    """GRPO's RL layer (ResponseMaskedMoELayer) and VP2O's: with a response mask the router's aux-loss
    gradient is that of the response tokens alone, the same in both, and not the whole batch's."""
    got = checks["aux_mask"]
    assert got[algo]["masked_vs_alone"] <= 1e-6 * got[algo]["scale"], got
    assert got[algo]["masked_vs_all"] > 1e-3 * got[algo]["scale"], got
    assert got["grpo_vs_vp2o"] == 0.0, got


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_raw_outputs_are_gathered_per_token(checks, dispatcher):
    got = checks[f"ortho/{dispatcher}"]
    assert got["raw_diff"] < 1e-5
    assert got["out_diff"] < 1e-5
    assert got["grad_diff"] < 1e-5 and got["num_grads"][0] == got["num_grads"][1] > 3, got
    assert got["counts"] == got["expected_counts"]
    assert got["index_path"] == ([True] if dispatcher == "alltoall" else [])  # alltoall: one index_copy
    assert got["no_grad_calls"] == len(got["index_path"])  # the no-grad forward took megatron's own path


def test_hook_tensor_work_traces_fullgraph():
    """transport_rows (rank-two repulsion added in place) traces with fullgraph=True and equals
    algo.stein.stein_transport with the repulsion materialised in the trailing (fc2) columns; with
    ok=False it hands finite gradients back unchanged."""
    from megatron_vp2o.algo import coactivation, kernels, stein
    from megatron_vp2o.algo.config import SteinConfig
    from megatron_vp2o.algo.prototypes import normalize
    from megatron_vp2o.distributed.stein_hook import layer_masks, transport_rows

    cfg, num_experts, rows, cols = SteinConfig(), 8, 4, 6
    gen = torch.Generator().manual_seed(0)
    counts_EE = torch.randint(0, 5, (num_experts, num_experts), generator=gen).float()
    counts_EE = counts_EE + counts_EE.T
    counts_EE[3] = counts_EE[:, 3] = 0.0  # expert 3 inactive
    protos_ED = normalize(torch.randn(num_experts, 16, generator=gen))
    grads_EP = torch.randn(num_experts, 10 + rows * cols, generator=gen)  # 10 fc1 columns, then fc2 [4, 6]
    left_EA2 = torch.randn(num_experts, rows, 2, generator=gen)
    right_E2C = torch.randn(num_experts, 2, cols, generator=gen)

    def hook(counts_EE, protos_ED, grads_EP, left, right, ok):
        active_E, _, _, _, idx_EM1, w_EM1 = layer_masks(counts_EE, protos_ED, 128.0, cfg, 2)
        fc1, fc2 = grads_EP[:, :10], grads_EP[:, 10:].contiguous()
        out1, _ = transport_rows(fc1, idx_EM1, w_EM1, active_E, ok)
        out2, _ = transport_rows(fc2, idx_EM1, w_EM1, active_E, ok, (left, right), 0.01)
        return torch.cat([out1, out2], dim=1)

    ok = torch.tensor(True)
    eager = hook(counts_EE, protos_ED, grads_EP, left_EA2, right_E2C, ok)
    compiled = torch.compile(hook, backend="eager", fullgraph=True)(counts_EE, protos_ED, grads_EP, left_EA2,
                                                                   right_E2C, ok)
    assert torch.allclose(eager, compiled)
    m = cfg.resolved_topm(2)
    coactive, _ = coactivation.neighbour_masks(coactivation.coactivation_matrix(counts_EE, 128.0), m)
    rep_EP = torch.cat([torch.zeros(num_experts, 10), (left_EA2 @ right_E2C).reshape(num_experts, -1)], dim=1)
    ref = stein.stein_transport(grads_EP, kernels.prototype_kernel(protos_ED, **cfg.kernel_args()), coactive,
                                coactivation.active_experts(counts_EE), topm=m, repulsion_EP=rep_EP,
                                repulsion_coef=0.01)
    assert torch.allclose(eager, ref, atol=1e-6) and eager[3].abs().max() == 0
    same = hook(counts_EE, protos_ED, grads_EP, left_EA2, right_E2C, torch.tensor(False))
    assert torch.equal(same, grads_EP)


def test_hook_relative_change_matches_the_pure_diagnostic():
    """The hook's Stein relative change (transport_rows' attraction shift + the rank-two repulsion
    norm, one rank) equals algo.diagnostics.relative_change on the materialised tensors."""
    from megatron_vp2o.algo import diagnostics
    from megatron_vp2o.algo.config import SteinConfig
    from megatron_vp2o.algo.prototypes import normalize
    from megatron_vp2o.distributed import stein_hook
    from megatron_vp2o.distributed.reductions import VP2OGroups

    cfg, num_experts, rows, cols = SteinConfig(kernel_bandwidth="median", kernel_sharpness=2.0), 8, 4, 6
    gen = torch.Generator().manual_seed(1)
    counts_EE = torch.randint(0, 5, (num_experts, num_experts), generator=gen).float()
    counts_EE = counts_EE + counts_EE.T
    counts_EE[3] = counts_EE[:, 3] = 0.0
    protos_ED = normalize(torch.randn(num_experts, 16, generator=gen))
    fc2 = torch.randn(num_experts, rows * cols, generator=gen)
    left, right = torch.randn(num_experts, rows, 2, generator=gen), torch.randn(num_experts, 2, cols, generator=gen)
    active_E, _, _, _, idx, w = stein_hook.layer_masks(counts_EE, protos_ED, 128.0, cfg, 2)
    ok = torch.tensor(True)
    out, _, shift = stein_hook.transport_rows(fc2, idx, w, active_E, ok, (left, right), 0.01, raw_XP=fc2)
    attracted, _ = stein_hook.transport_rows(fc2, idx, w, active_E, ok)
    assert torch.allclose(shift, torch.linalg.vector_norm(attracted - fc2))
    groups = VP2OGroups(tokens=[], expert_tp=None, expert_ep=None, expert_dp=None)
    sq = torch.stack([fc2.square().sum(), shift * shift, torch.linalg.vector_norm(out - fc2) ** 2])
    got = stein_hook._relative_change(sq[None], ((left[None], right[None])), active_E[None], ok, 0.01, groups)[0]
    rep_EP = torch.where(active_E[:, None], (left @ right).reshape(num_experts, -1), 0.0)
    ref = diagnostics.relative_change(fc2, attracted, rep_EP, 0.01)
    assert torch.allclose(got, torch.stack([ref["attraction"], ref["repulsion"], ref["total"]]), rtol=1e-5)


def test_attraction_switch_removes_exactly_the_attraction():
    """stein.attraction=false: active experts keep their own gradient plus the repulsion, with the
    same co-active / inactive sets (so the same repellers) as with the attraction on."""
    from megatron_vp2o.algo.config import SteinConfig
    from megatron_vp2o.algo.prototypes import normalize
    from megatron_vp2o.distributed.stein_hook import layer_masks, transport_rows

    gen = torch.Generator().manual_seed(2)
    counts_EE = torch.randint(0, 5, (8, 8), generator=gen).float()
    counts_EE = counts_EE + counts_EE.T
    counts_EE[5] = counts_EE[:, 5] = 0.0
    protos_ED = normalize(torch.randn(8, 16, generator=gen))
    fc2 = torch.randn(8, 12, generator=gen)
    left, right = torch.randn(8, 3, 2, generator=gen), torch.randn(8, 2, 4, generator=gen)
    on = layer_masks(counts_EE, protos_ED, 64.0, SteinConfig(), 2)
    off = layer_masks(counts_EE, protos_ED, 64.0, SteinConfig(attraction=False), 2)
    assert all(torch.equal(a, b) for a, b in zip(on[:4], off[:4]))  # active, co-active, inactive, kernel
    out, _ = transport_rows(fc2, off[4], off[5], off[0], torch.tensor(True), (left, right), 0.01)
    expected = torch.where(off[0][:, None], fc2 + 0.01 * (left @ right).reshape(8, -1), 0.0)
    assert torch.allclose(out, expected, atol=1e-6)

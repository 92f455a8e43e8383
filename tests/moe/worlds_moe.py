"""Checks of `VP2OMoELayer` and `ExpertAccessor` that run inside one 1-rank world (megatron state).

Each check returns plain numbers/bools; tests/moe/test_layer.py asserts on them.
"""

from __future__ import annotations

import torch

from distributed.worlds_foundation import tiny_config


def _layer_and_input(expert_impl: str, dtype: str = "fp32", ortho: float = 0.0, dispatcher: str = "alltoall"):
    from megatron_vp2o.algo.config import SpecializationConfig
    from megatron_vp2o.model import build_gpt, transformer_config
    from megatron_vp2o.moe import vp2o_layers, vp2o_moe_layer

    cfg = tiny_config(model={"expert_impl": expert_impl, "params_dtype": dtype, "dispatcher": dispatcher})
    tconf = transformer_config(cfg.model, cfg.parallel, calculate_per_token_loss=True)
    model = build_gpt(cfg.model, tconf, moe_layer_cls=vp2o_moe_layer(SpecializationConfig(ortho, 0.0)))
    layer = vp2o_layers(model)[0]
    hidden = torch.randn(16, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(3))
    return layer, hidden.to(layer.protos_XD.dtype if dtype == "fp32" else torch.bfloat16)


def accessor_checks(layout: str, dtype: str) -> dict:
    """fc2 view equals megatron's per-expert weight; grads round-trip; element masks by expert."""
    layer, _ = _layer_and_input(layout, dtype)
    acc, ex = layer.accessor, layer.experts
    w_XDF = acc.fc2_weight_XDF()
    if layout == "grouped":
        ref = ex.weight2.view(acc.num_local, -1, ex.config.hidden_size)  # megatron's own w2 view
        fc2_ok = all(torch.equal(w_XDF[x], ref[x].T) for x in range(acc.num_local))
    else:
        fc2_ok = all(torch.equal(w_XDF[x], e.linear_fc2.weight) for x, e in enumerate(ex.local_experts))
    for p in acc.params:
        p.param.main_grad = torch.zeros_like(p.param, dtype=torch.float32)
    grads_XP = torch.randn(acc.num_local, acc.grads_XP().shape[1])
    acc.write_grads_XP(grads_XP)
    roundtrip = torch.equal(acc.grads_XP(), grads_XP)
    fc2_cols = acc.grads_XP()[:, acc.fc2_offset():]
    flat_ok = acc.fc2_flat(w_XDF.float()).shape == fc2_cols.shape
    keep_X = torch.arange(acc.num_local) % 2 == 0
    mask_ok = True
    for p in acc.params:
        mask = acc.element_mask(p.param, keep_X)
        rows = mask.reshape(len(p.ids), -1)
        mask_ok &= all(bool(rows[i].all() == keep_X[x] and rows[i].any() == keep_X[x])
                       for i, x in enumerate(p.ids))
    return {"fc2": fc2_ok, "roundtrip": roundtrip, "fc2_flat_shape": flat_ok, "mask": mask_ok,
            "shape": tuple(w_XDF.shape), "repulsion_layout": _repulsion_layout_diff(layer),
            "no_grad_forward_rel_diff": _no_grad_forward_diff(layer)}


def _no_grad_forward_diff(layer) -> float:
    """Expert output without autograd (GroupedMLP on CPU: one torch._grouped_mm) vs with it (the
    per-group loop), relative to the output's scale."""
    x = torch.randn(64, layer.config.hidden_size, generator=torch.Generator().manual_seed(4)).to(
        next(layer.experts.parameters()).dtype)
    tokens = torch.tensor([8, 0, 16, 4, 12, 8, 0, 16])
    probs = torch.ones(64, dtype=torch.float32)
    calls, grouped_mm = [], torch._grouped_mm
    torch._grouped_mm = lambda *a, **k: calls.append(1) or grouped_mm(*a, **k)
    try:
        with torch.no_grad():
            fast, _ = layer.experts(x, tokens, probs)
        no_grad_calls = len(calls)
        slow, _ = layer.experts(x.clone().requires_grad_(True), tokens, probs)
    finally:
        torch._grouped_mm = grouped_mm
    expected = (2, 0) if hasattr(layer.experts, "weight1") else (0, 0)  # GroupedMLP: fc1 and fc2 grouped, no grad
    assert (no_grad_calls, len(calls) - no_grad_calls) == expected, (no_grad_calls, len(calls))
    return float((fast.float() - slow.detach().float()).abs().max() / slow.detach().float().abs().max())


def _repulsion_layout_diff(layer) -> float:
    """The hook's rank-two repulsion, added in place into zero fc2 rows, vs the materialised
    dR/dW mapped through ``fc2_flat`` (the layout rule of each expert implementation)."""
    from megatron_vp2o.algo.config import SteinConfig
    from megatron_vp2o.algo.prototypes import normalize
    from megatron_vp2o.algo.stein import repulsion_grad
    from megatron_vp2o.distributed.reductions import VP2OGroups
    from megatron_vp2o.distributed.stein_hook import layer_repulsion, transport_rows

    acc, num_experts = layer.accessor, layer.config.num_moe_experts
    cfg = SteinConfig(repulsion_coef=1.0)
    protos_ED = normalize(torch.randn(num_experts, layer.config.hidden_size, generator=torch.Generator().manual_seed(3)))
    inactive_EE = ~torch.eye(num_experts, dtype=torch.bool)
    (left, right), _ = layer_repulsion([layer], inactive_EE[None], protos_ED[None], cfg,
                                       VP2OGroups.from_parallel_state(False))
    rows = acc.fc2_flat(acc.fc2_weight_XDF().float()).shape[1]
    idx = torch.arange(num_experts).view(1, -1, 1)
    out, _ = transport_rows(torch.zeros(1, num_experts, rows), idx, torch.ones(1, num_experts, 1),
                            torch.ones(1, num_experts, dtype=torch.bool), torch.tensor(True), (left, right), 1.0)
    ref = acc.fc2_flat(repulsion_grad(acc.fc2_weight_XDF().float(), protos_ED, inactive_EE, cfg.kernel_tau0, cfg.kernel,
                                       0, cfg.kernel_bandwidth, cfg.kernel_sharpness))
    return float((out[0] - ref).abs().max() / ref.abs().max())


def ortho_capture_checks(dispatcher: str) -> dict:
    """Raw per-token outputs through the dispatcher equal the experts applied to each token; the
    layer output (gated sum formed token side) equals megatron's own expert path."""
    layer, hidden = _layer_and_input("sequential", ortho=1.0, dispatcher=dispatcher)
    layer.train()
    captured = {}
    from megatron_vp2o.algo import specialization

    original = specialization.gated_sum_and_orthogonality

    def spy(raw_TKD, gates_TK, *args, **kwargs):
        captured["raw"] = raw_TKD
        return original(raw_TKD, gates_TK, *args, **kwargs)

    specialization.gated_sum_and_orthogonality = spy
    paths, rows_to_slots = [], layer._rows_to_slots
    layer._rows_to_slots = lambda rows: paths.append(rows_to_slots(rows) is not None) or rows_to_slots(rows)
    try:
        out_vp2o = layer(hidden)[0].detach()  # with autograd on: the capture runs only where losses are made
    finally:
        specialization.gated_sum_and_orthogonality = original
    captured["raw"] = captured["raw"].detach()
    with torch.no_grad():
        layer(hidden)  # a no-grad forward (rollouts, evaluation) skips the capture and the losses
        captured["no_grad_calls"] = len(paths)
        layer.spec_cfg = type(layer.spec_cfg)(0.0, 0.0)
        out_plain, _ = layer(hidden)
        probs_TE, _ = layer.router(hidden)
        topk_TK = torch.sort(torch.topk((probs_TE > 0).float(), layer.top_k).indices, -1).values
        x_TD = hidden.reshape(-1, hidden.shape[-1])
        ones = torch.ones(x_TD.shape[0])
        manual = torch.stack([
            torch.stack([layer.experts.local_experts[int(e)](x_TD[t:t + 1], ones[:1])[0][0]
                         for e in topk_TK[t]]) for t in range(x_TD.shape[0])])
    layer.flush_stats()
    counts = float(layer.counts_EE.diagonal().sum())
    grads = {}
    for name, coef in (("ortho", 1e-30), ("plain", 0.0)):  # the ortho loss itself ~ 0: same gradients
        layer.spec_cfg = type(layer.spec_cfg)(coef, 0.0)
        layer.zero_grad()
        x = hidden.clone().requires_grad_(True)
        out, _ = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads[name] = [x.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads["ortho"], grads["plain"]))
    return {"raw_diff": (captured["raw"] - manual).abs().max().item(),
            "out_diff": (out_vp2o - out_plain).abs().max().item(), "grad_diff": grad_diff,
            "num_grads": (len(grads["ortho"]), len(grads["plain"])), "index_path": paths[:1],
            "counts": counts, "expected_counts": 3 * x_TD.shape[0] * layer.top_k,
            "no_grad_calls": captured["no_grad_calls"]}


def aux_mask_checks() -> dict:
    """The router aux-loss gradient of GRPO's RL layer (``ResponseMaskedMoELayer``) and of VP2O's, with a
    response mask over the last columns: max abs difference to the gradient of those tokens alone (no
    mask), to the other layer's, and (to show the mask acts) to the unmasked batch's."""
    from megatron_vp2o.algo.config import SpecializationConfig
    from megatron_vp2o.model import build_gpt, transformer_config
    from megatron_vp2o.moe.layer import ResponseMaskedMoELayer, response_tokens, vp2o_moe_layer

    cfg = tiny_config(model={"router": {"aux_loss_type": "aux_loss", "aux_loss_coeff": 0.1}})
    tconf = transformer_config(cfg.model, cfg.parallel, calculate_per_token_loss=True)
    layers = {}
    for name, cls in (("grpo", ResponseMaskedMoELayer), ("vp2o", vp2o_moe_layer(SpecializationConfig(0.0, 0.0)))):
        model = build_gpt(cfg.model, tconf, moe_layer_cls=cls)
        layers[name] = next(m for m in model.modules() if isinstance(m, ResponseMaskedMoELayer))
    layers["vp2o"].load_state_dict(layers["grpo"].state_dict(), strict=False)
    hidden = torch.randn(16, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(5))
    mask_BS = torch.zeros(2, 16)
    mask_BS[:, 10:] = 1.0  # the response: the last 6 columns of both sequences

    def router_grad(layer, x, mask=None) -> torch.Tensor:
        layer.train()
        layer.zero_grad()
        x = x.clone().requires_grad_(True)
        if mask is None:
            out, _ = layer(x)
        else:
            with response_tokens(layer, mask):
                out, _ = layer(x)
        (out * 0.0).sum().backward()  # only the aux loss reaches the router
        return layer.router.weight.grad.clone()

    out = {}
    for name, layer in layers.items():
        masked, alone = router_grad(layer, hidden, mask_BS), router_grad(layer, hidden[10:])
        out[name] = {"masked_vs_alone": (masked - alone).abs().max().item(), "scale": alone.abs().max().item(),
                     "masked_vs_all": (masked - router_grad(layer, hidden)).abs().max().item(), "grad": masked}
    out["grpo_vs_vp2o"] = (out["grpo"].pop("grad") - out["vp2o"].pop("grad")).abs().max().item()
    return out


def run_all(payload) -> dict:
    from megatron_vp2o.distributed.init import init_parallel

    init_parallel(tiny_config())
    from megatron_vp2o import compat

    out = {"sequential": accessor_checks("sequential", "fp32"),
           "grouped": accessor_checks("grouped", "bf16") if compat.HAS_LEGACY_GROUPED_MLP else None,
           "ortho/alltoall": ortho_capture_checks("alltoall"),
           "ortho/allgather": ortho_capture_checks("allgather"),
           "aux_mask": aux_mask_checks()}
    return out

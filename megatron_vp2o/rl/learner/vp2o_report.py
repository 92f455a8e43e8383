"""The metrics of one VP2O learner step (method §2.13), read to the host in one transfer.

``step_report`` turns what ``rl.learner.vp2o.vp2o_train_step`` did (loss, decision, D_anc and its
trace, backtracks, grad norm) and what the VP2O layers accumulated during the step (utilisation,
prototype and co-activation overlap, specialisation losses, router entropy) into flat Python numbers.
Every tensor-valued entry is gathered into one buffer and copied once: one host sync per step.

Shape legend: E experts.
"""

from __future__ import annotations

import torch

from megatron.core import parallel_state as ps

from megatron_vp2o.algo import trust_region as tr
from megatron_vp2o.algo.loss_grads import loss_grad_norms
from megatron_vp2o.distributed.reductions import all_reduce_, group_size
from megatron_vp2o.algo.diagnostics import coactivation_cosine
from megatron_vp2o.training.step import reduce_report


def step_report(state, losses, metrics: dict, applied: dict, timing: dict) -> dict:
    """Flat metrics of a step that was applied. ``applied``: ``decision`` (code), ``d_anc``,
    ``backtracks``, ``grad_norm``, ``update_ok``; ``metrics``: the Stein transport's (tensors or
    numbers); ``timing``: ``timing/<phase>`` seconds. Counts the decision in ``state.counters``."""
    decision = applied["decision"]
    state.counters[tr.DECISION_NAMES[decision]] += 1
    loss_sum, count = reduce_report(losses).tolist()
    grad_norm = applied["grad_norm"]
    out = {"loss": loss_sum / max(count, 1.0), "tokens": int(count), "decision": tr.DECISION_NAMES[decision],
           "d_anc": applied["d_anc"], "backtracks": applied["backtracks"], "update_ok": bool(applied["update_ok"]),
           "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
    out |= {f"count/{k}": v for k, v in state.counters.items()}
    out["d_anc_trace"] = list(state.d_anc_trace)
    lazy = {}  # every tensor-valued metric, read to the host in one transfer below
    for layer in state.layers:
        n = layer.layer_number
        tokens_E = torch.diagonal(layer.counts_EE)
        lazy[f"moe/utilisation/layer{n}"] = tokens_E
        lazy[f"moe/proto_overlap/layer{n}"] = offdiag_abs_mean(layer.protos_ED @ layer.protos_ED.T)
        lazy[f"moe/coact_overlap/layer{n}"] = coactivation_cosine(layer.counts_EE)  # 1: redundant pairs
        lazy[f"loss/ortho/layer{n}"], lazy[f"loss/var/layer{n}"] = layer.loss_log[0], layer.loss_log[1]
        lazy[f"moe/router_entropy/layer{n}"] = layer.loss_log[2] / layer.loss_log[3].clamp_min(1.0)
    lazy |= {k: v for k, v in metrics.items() if torch.is_tensor(v)}
    out |= {k: v for k, v in metrics.items() if not torch.is_tensor(v)}
    out |= to_host(lazy, lists=("moe/utilisation/",))
    out |= timing
    return out


def loss_grad_metrics(layers, spec_cfg, lm_tokens: float) -> dict:
    """``spec/grad_norm_{ortho,var,pg}/layerN`` and ``spec/grad_ratio_{ortho,var}/layerN`` (term / pg)
    of a step that ran the loss-gradient diagnostic (`moe.layer.start_grad_probe`; docs/method.md
    §2.13): each layer's squared norms summed over the data-parallel ranks (one all-reduce of [L, 3]),
    then `algo.loss_grads.loss_grad_norms` (RMS over the ranks, divided by the global count N). A
    term whose coefficient is 0 is left out. Device tensors, read with the step's other metrics."""
    if not layers:
        return {}
    sq_L3 = torch.stack([layer.probe_sq for layer in layers])
    group = ps.get_data_parallel_group(with_context_parallel=True)
    all_reduce_(sq_L3, group)
    got = loss_grad_norms(sq_L3, lm_tokens, group_size(group))
    terms = [t for t, coef in (("ortho", spec_cfg.ortho_coef), ("var", spec_cfg.var_coef)) if coef > 0]
    out = {}
    for i, layer in enumerate(layers):
        n = layer.layer_number
        out[f"spec/grad_norm_pg/layer{n}"] = got["pg"][i]
        for t in terms:
            out[f"spec/grad_norm_{t}/layer{n}"] = got[t][i]
            out[f"spec/grad_ratio_{t}/layer{n}"] = got[f"ratio_{t}"][i]
    return out


def to_host(tensors: dict, lists: tuple[str, ...] = ()) -> dict:
    """Python numbers (lists for keys starting with one of ``lists``) with one device->host copy."""
    if not tensors:
        return {}
    device = next(iter(tensors.values())).device
    flat = [t.detach().reshape(-1).float().to(device) for t in tensors.values()]
    values = torch.cat(flat).tolist()
    out, i = {}, 0
    for (key, _), t in zip(tensors.items(), flat):
        chunk = values[i:i + t.numel()]
        i += t.numel()
        out[key] = chunk if key.startswith(lists) else chunk[0]
    return out


def offdiag_abs_mean(m_EE: torch.Tensor) -> torch.Tensor:
    """Mean |m| over the off-diagonal entries of an [E, E] matrix (0 for E = 1)."""
    e = m_EE.shape[0]
    return (m_EE.abs().sum() - m_EE.diagonal().abs().sum()) / max(e * e - e, 1)

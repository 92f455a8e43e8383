"""The metrics of one VP2O learner step (method §2.13), read to the host in one transfer.

``step_report`` turns what ``rl.learner.vp2o.vp2o_train_step`` did (loss, decision, D_anc and its
trace, backtracks, grad norm) and what the VP2O layers accumulated during the step (utilisation,
prototype and co-activation overlap, specialisation losses, router entropy) into flat Python numbers.
Every tensor-valued entry is gathered into one buffer and copied once: one host sync per step.

Shape legend: E experts.
"""

from __future__ import annotations

import torch

from megatron_vp2o.algo import trust_region as tr
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

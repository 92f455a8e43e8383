"""Uniform access to the local experts' weights and gradients for every megatron expert layout.

What: the Stein transport (method §2.8) treats each expert as one particle with flattened parameters
theta_e, and the prototypes (method §2.4) need each expert's fc2 weight W_e as [D, F] (torch
[out, in] layout). megatron-core stores experts three ways:

| layout | fc1 | fc2 | W_e [D, F] |
|---|---|---|---|
| ``SequentialMLP`` | ``local_experts[x].linear_fc1.weight`` [F1, D] | ``local_experts[x].linear_fc2.weight`` [D, F] | the fc2 weight (stacked: a copy) |
| ``GroupedMLP`` (legacy) | ``weight1`` [D, X*F1], expert x = flat chunk x | ``weight2`` [X*F, D] = view [X, F, D] | ``weight2.view(X, F, D).transpose(1, 2)`` (a view) |
| ``TEGroupedMLP`` | ``linear_fc1.weight{x}`` [F1, D] | ``linear_fc2.weight{x}`` [D, F] | stacked (a copy) |

Why one accessor: the hook, the prototype refresh and the freeze of inactive experts all read
"expert x's slice of parameter p" the same way: every expert parameter is described as
(param, expert ids) such that ``param.view(len(ids), -1)[i]`` belongs to local expert ids[i].
Flattened gradients [X, P] concatenate fc1 then fc2 per expert in that storage order, so writing
a transformed gradient back is a row copy; `fc2_flat` maps a [X, D, F] tensor (the repulsion
gradient) into the fc2 columns of that layout.

Shape legend: X local experts, D hidden, F expert ffn (local shard under expert-TP), F1 fc1
output rows (2F with a gated unit), P flattened parameters per expert (P1 fc1 + P2 fc2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertParam:
    """One parameter tensor that holds expert rows: ``param.view(len(ids), -1)[i]`` is expert ids[i]."""

    param: torch.nn.Parameter
    ids: tuple[int, ...]
    kind: str  # "fc1" or "fc2"


def _grad_of(param: torch.Tensor) -> torch.Tensor:
    """megatron DDP keeps the reduced gradient in ``main_grad``; plain modules in ``grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


class ExpertAccessor:
    """Weights, gradients and expert ownership of one MoE layer's local experts (any layout)."""

    def __init__(self, experts: torch.nn.Module, hidden: int):
        self.experts, self.hidden = experts, hidden
        self.num_local = experts.num_local_experts
        name = type(experts).__name__
        x_ids = tuple(range(self.num_local))
        if hasattr(experts, "local_experts"):
            self.layout = "sequential"
            fc1 = [e.linear_fc1.weight for e in experts.local_experts]
            fc2 = [e.linear_fc2.weight for e in experts.local_experts]
        elif hasattr(experts, "weight1"):
            self.layout = "grouped"
            self.params = [ExpertParam(experts.weight1, x_ids, "fc1"),
                           ExpertParam(experts.weight2, x_ids, "fc2")]
            return
        elif hasattr(experts, "linear_fc2") and hasattr(experts.linear_fc2, "weight0"):
            self.layout = "te_grouped"
            fc1 = [getattr(experts.linear_fc1, f"weight{x}") for x in x_ids]
            fc2 = [getattr(experts.linear_fc2, f"weight{x}") for x in x_ids]
        else:
            raise NotImplementedError(f"unknown expert layout {name}")
        self.params = [ExpertParam(p, (x,), "fc1") for x, p in enumerate(fc1)]
        self.params += [ExpertParam(p, (x,), "fc2") for x, p in enumerate(fc2)]

    # --- weights -------------------------------------------------------------------------------
    def fc2_weight_XDF(self) -> torch.Tensor:
        """Each local expert's fc2 weight as [X, D, F] (a view for GroupedMLP, a stack otherwise)."""
        if self.layout == "grouped":
            w2 = self.experts.weight2
            return w2.view(self.num_local, -1, self.hidden).transpose(1, 2).detach()
        return torch.stack([p.param.detach() for p in self.params if p.kind == "fc2"])

    @property
    def fc2_transposed(self) -> bool:
        """True when each expert's flat fc2 gradient row holds W^T ([F, D], GroupedMLP), not W."""
        return self.layout == "grouped"

    def fc2_flat(self, fc2_XDF: torch.Tensor) -> torch.Tensor:
        """A [X, D, F] tensor laid out like the flattened fc2 gradient rows: [X, P2]."""
        if self.layout == "grouped":
            return fc2_XDF.transpose(1, 2).reshape(self.num_local, -1)
        return fc2_XDF.reshape(self.num_local, -1)

    # --- gradients -----------------------------------------------------------------------------
    def grad_views(self, kind: str) -> list[torch.Tensor]:
        """The gradient of every ``kind`` ("fc1"/"fc2") parameter as a [len(ids), P_kind] view, in
        local expert order: concatenated along dim 0 they are the [X, P_kind] block."""
        return [_grad_of(p.param).view(len(p.ids), -1) for p in self.params if p.kind == kind]

    def _kind_grads(self, kind: str) -> torch.Tensor:
        rows = self.grad_views(kind)
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)

    def grads_XP(self) -> torch.Tensor:
        """Flattened gradients [X, P] = [fc1 | fc2] per local expert (a new tensor)."""
        return torch.cat([self._kind_grads("fc1"), self._kind_grads("fc2")], dim=1)

    def fc2_offset(self) -> int:
        """Column where fc2 starts in `grads_XP`."""
        return sum(p.param.numel() for p in self.params if p.kind == "fc1") // self.num_local

    def write_grads_XP(self, grads_XP: torch.Tensor) -> None:
        """Write a transformed [X, P] gradient back into the gradient buffers (in place): per block,
        one fused copy into the `grad_views` (what the Stein hook does for a batch of layers)."""
        split = self.fc2_offset()
        for kind, cols in (("fc1", grads_XP[:, :split]), ("fc2", grads_XP[:, split:])):
            views = self.grad_views(kind)
            torch._foreach_copy_(views, list(cols.split([v.shape[0] for v in views])))

    # --- ownership -----------------------------------------------------------------------------
    def element_mask(self, param: torch.Tensor, keep_X: torch.Tensor) -> torch.Tensor | None:
        """Bool mask shaped like ``param``: True on elements of experts with keep_X True; None if
        ``param`` is not an expert parameter of this layer."""
        for p in self.params:
            if p.param is param:
                rows = keep_X[list(p.ids)]
                return rows.view(-1, 1).expand(len(p.ids), param.numel() // len(p.ids)).reshape(
                    param.shape)
        return None

"""Prototype kernels k(u_i, u_j) between experts of one layer (spec 2.6).

What: k_ij = f(c_ij) with c_ij = u_i . u_j the cosine of two unit prototypes and a temperature
tau_E = tau0 / log(E + 1) that sharpens the kernel as the number of experts grows:
- ``sq_cos`` (default): k = exp(-(1 - c^2) / tau_E). Sign-invariant, as prototypes (singular
  vectors) have arbitrary signs.
- ``cos``: k = exp(-(1 - c) / tau_E), sign-sensitive (ablation).
Why a registry: each form also gives dk/dc, which the closed-form repulsion gradient (spec 2.8)
needs; adding a form is one registration, and configs name it.

Departures: the paper states the kernel in prose only; this form and tau_E are OURS (spec 2.6).
The diagonal is exactly 1 for both forms (c_ii = 1 for unit prototypes).

Shape legend: E experts, D hidden. Leading batch dims (e.g. layers) pass through.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .registry import Registry


class KernelForm(NamedTuple):
    """k(c, tau) and its derivative dk/dc(c, tau), elementwise on cosines."""

    value: Callable[[torch.Tensor, float], torch.Tensor]
    dvalue: Callable[[torch.Tensor, float], torch.Tensor]


KERNELS: Registry[KernelForm] = Registry("kernel")


def _sq_cos(cos: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.exp(-(1.0 - cos * cos) / tau)


def _sq_cos_grad(cos: torch.Tensor, tau: float) -> torch.Tensor:
    return _sq_cos(cos, tau) * (2.0 * cos / tau)


def _cos(cos: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.exp(-(1.0 - cos) / tau)


def _cos_grad(cos: torch.Tensor, tau: float) -> torch.Tensor:
    return _cos(cos, tau) / tau


KERNELS.register("sq_cos")(KernelForm(_sq_cos, _sq_cos_grad))
KERNELS.register("cos")(KernelForm(_cos, _cos_grad))


def kernel_temperature(num_experts: int, tau0: float) -> float:
    """tau_E = tau0 / log(E + 1) (spec 2.6); a Python float (E is static)."""
    if num_experts < 1 or tau0 <= 0:
        raise ValueError(f"need num_experts >= 1 and tau0 > 0 (got {num_experts}, {tau0})")
    return tau0 / math.log(num_experts + 1)


def prototype_cosines(protos_ED: torch.Tensor) -> torch.Tensor:
    """c_ij = u_i . u_j for unit prototypes: [..., E, D] -> [..., E, E]."""
    return torch.matmul(protos_ED, protos_ED.transpose(-1, -2))


def prototype_kernel(
    protos_ED: torch.Tensor, tau0: float, form: str = "sq_cos"
) -> torch.Tensor:
    """k_ij = f(u_i . u_j; tau_E) for one layer (or a batch of layers): [..., E, D] -> [..., E, E].

    tau_E = tau0 / log(E + 1) uses E = protos_ED.shape[-2] (spec 2.6).
    """
    tau = kernel_temperature(protos_ED.shape[-2], tau0)
    return KERNELS.get(form).value(prototype_cosines(protos_ED), tau)


def cross_kernel(
    protos_XD: torch.Tensor, protos_ED: torch.Tensor, tau: float, form: str = "sq_cos"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, dk/dc) between X query prototypes and all E prototypes at a given tau: [X, E] each.

    Used by the repulsion, where the queries are one-step-updated prototypes of the local experts.
    """
    kernel = KERNELS.get(form)
    cos_XE = torch.matmul(protos_XD, protos_ED.transpose(-1, -2))
    return kernel.value(cos_XE, tau), kernel.dvalue(cos_XE, tau)

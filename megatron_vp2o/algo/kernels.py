"""Prototype kernels k(u_i, u_j) between experts of one layer (method §2.6).

What: k_ij = exp(-d(c_ij) / tau) with c_ij = u_i . u_j the cosine of two unit prototypes, a
distance d per form, and a temperature tau:
- ``sq_cos`` (default): d = 1 - c^2. Sign-invariant, as prototypes (singular vectors) have
  arbitrary signs.
- ``cos``: d = 1 - c (half the squared Euclidean distance), sign-sensitive (ablation).
The temperature comes from a bandwidth rule (`BANDWIDTHS`) divided by a sharpness s (>0, 1 = as
the rule says):
- ``fixed`` (default): tau = tau0 / log(E + 1) / s, the same for every layer and step.
- ``median``: SVGD's median heuristic (Liu & Wang 2016): tau = h / s with h = median of the
  off-diagonal d_ij of the layer / log(E + 1), recomputed from the current prototypes (a tensor,
  no host sync; not differentiated, as in SVGD). At s = 1 the median pair gets k = 1/(E + 1)
  whatever the geometry; larger s spreads the off-diagonal k apart (and shrinks them all).
Why a registry: each form also gives dk/dc, which the closed-form repulsion gradient (method §2.8)
needs; adding a form is one registration, and configs name it.

Departures: the paper states the kernel in prose only; these forms, tau_E and the sharpness are
OURS (method §2.6). The diagonal is exactly 1 for every form and bandwidth (c_ii = 1).

Shape legend: E experts, D hidden. Leading batch dims (e.g. layers) pass through.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .registry import Registry


Tau = float | torch.Tensor  # a Python float, or a [..., 1, 1] tensor per layer (median rule)


class KernelForm(NamedTuple):
    """k(c, tau), its derivative dk/dc(c, tau) and the distance d(c), elementwise on cosines."""

    value: Callable[[torch.Tensor, Tau], torch.Tensor]
    dvalue: Callable[[torch.Tensor, Tau], torch.Tensor]
    distance: Callable[[torch.Tensor], torch.Tensor]


KERNELS: Registry[KernelForm] = Registry("kernel")
#: Bandwidth rules for tau (module docstring).
BANDWIDTHS = ("fixed", "median")


def _sq_cos_dist(cos: torch.Tensor) -> torch.Tensor:
    return 1.0 - cos * cos


def _sq_cos(cos: torch.Tensor, tau: Tau) -> torch.Tensor:
    return torch.exp(-_sq_cos_dist(cos) / tau)


def _sq_cos_grad(cos: torch.Tensor, tau: Tau) -> torch.Tensor:
    return _sq_cos(cos, tau) * (2.0 * cos / tau)


def _cos_dist(cos: torch.Tensor) -> torch.Tensor:
    return 1.0 - cos


def _cos(cos: torch.Tensor, tau: Tau) -> torch.Tensor:
    return torch.exp(-_cos_dist(cos) / tau)


def _cos_grad(cos: torch.Tensor, tau: Tau) -> torch.Tensor:
    return _cos(cos, tau) / tau


KERNELS.register("sq_cos")(KernelForm(_sq_cos, _sq_cos_grad, _sq_cos_dist))
KERNELS.register("cos")(KernelForm(_cos, _cos_grad, _cos_dist))


def kernel_temperature(num_experts: int, tau0: float) -> float:
    """tau_E = tau0 / log(E + 1) (method §2.6); a Python float (E is static)."""
    if num_experts < 1 or tau0 <= 0:
        raise ValueError(f"need num_experts >= 1 and tau0 > 0 (got {num_experts}, {tau0})")
    return tau0 / math.log(num_experts + 1)


def prototype_cosines(protos_ED: torch.Tensor) -> torch.Tensor:
    """c_ij = u_i . u_j for unit prototypes: [..., E, D] -> [..., E, E]."""
    return torch.matmul(protos_ED, protos_ED.transpose(-1, -2))


def off_diagonal(matrix_EE: torch.Tensor) -> torch.Tensor:
    """The E (E - 1) off-diagonal entries of [..., E, E] as [..., E (E - 1)] (static shape)."""
    num_experts = matrix_EE.shape[-1]
    flat = matrix_EE.flatten(-2)[..., 1:]
    rows = flat.unflatten(-1, (num_experts - 1, num_experts + 1))[..., :-1]
    return rows.flatten(-2)


def median_off_diagonal(matrix_EE: torch.Tensor) -> torch.Tensor:
    """Median of the off-diagonal entries of [..., E, E] (mean of the two middle values; for a
    symmetric matrix the median over the E (E - 1) / 2 pairs): [...]. Needs E >= 2."""
    values = torch.sort(off_diagonal(matrix_EE), dim=-1).values
    half = values.shape[-1] // 2
    return 0.5 * (values[..., half - 1] + values[..., half])


def median_bandwidth(protos_ED: torch.Tensor, form: str = "sq_cos") -> torch.Tensor:
    """h = median_{i != j} d(u_i . u_j) / log(E + 1) per layer, detached: [..., E, D] -> [...].

    SVGD's median heuristic (Liu & Wang 2016) on the form's distance. E = 1 gives h = 1.
    """
    num_experts = protos_ED.shape[-2]
    if num_experts < 2:
        return torch.ones(protos_ED.shape[:-2], dtype=protos_ED.dtype, device=protos_ED.device)
    dist_EE = KERNELS.get(form).distance(prototype_cosines(protos_ED.detach()))
    return (median_off_diagonal(dist_EE) / math.log(num_experts + 1)).clamp_min(1e-6)


def kernel_tau(
    protos_ED: torch.Tensor,
    tau0: float,
    form: str = "sq_cos",
    bandwidth: str = "fixed",
    sharpness: float = 1.0,
) -> Tau:
    """The kernel temperature of a layer (module docstring): a float for ``fixed``, a [..., 1, 1]
    tensor for ``median`` (it broadcasts against [..., X, E] cosines)."""
    if sharpness <= 0:
        raise ValueError(f"sharpness must be > 0 (got {sharpness})")
    if bandwidth == "fixed":
        return kernel_temperature(protos_ED.shape[-2], tau0) / sharpness
    if bandwidth == "median":
        return (median_bandwidth(protos_ED, form) / sharpness)[..., None, None]
    raise ValueError(f"unknown kernel bandwidth {bandwidth!r}; choose from {', '.join(BANDWIDTHS)}")


def prototype_kernel(
    protos_ED: torch.Tensor,
    tau0: float,
    form: str = "sq_cos",
    bandwidth: str = "fixed",
    sharpness: float = 1.0,
) -> torch.Tensor:
    """k_ij = exp(-d(u_i . u_j) / tau) for one layer (or a batch of layers): [..., E, D] ->
    [..., E, E].

    tau from `kernel_tau`; with the defaults tau_E = tau0 / log(E + 1), E = protos_ED.shape[-2]
    (method §2.6).
    """
    tau = kernel_tau(protos_ED, tau0, form, bandwidth, sharpness)
    return KERNELS.get(form).value(prototype_cosines(protos_ED), tau)


def cross_kernel(
    protos_XD: torch.Tensor, protos_ED: torch.Tensor, tau: Tau, form: str = "sq_cos"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, dk/dc) between X query prototypes and all E prototypes at a given tau: [X, E] each.

    Used by the repulsion, where the queries are one-step-updated prototypes of the local experts.
    """
    kernel = KERNELS.get(form)
    cos_XE = torch.matmul(protos_XD, protos_ED.transpose(-1, -2))
    return kernel.value(cos_XE, tau), kernel.dvalue(cos_XE, tau)

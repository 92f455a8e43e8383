"""Expert prototypes: warm-started power iteration for each expert's top left singular vector.

What: u_e = top left singular vector of W_e = linear_fc2.weight [D, F] (torch [out, in] layout), the
dominant direction expert e writes into the residual stream (method §2.4). Prototypes live in R^D,
shared by all experts of a layer, so they are comparable across experts and feed the kernel
(method §2.6), the repulsion (method §2.8) and the anchor budget (method §2.10).

Why power iteration: one step is two batched mat-vecs, u <- W (W^T u), u <- u / ||u||; W W^T is
never formed. Warm-started from the previous prototypes, `power_iters` (default 2) steps per
optimizer step track the slowly moving singular vector; 30 steps from a fixed start at init.

Expert tensor parallelism splits W_e along F (row-parallel). Then W^T u is local to the F shard and
W (W^T u) is a partial sum: the distributed code calls `power_step_partial` on its shard,
all-reduces the [E, D] result over the expert-TP group and calls `normalize`. On a single shard
`power_iteration` is exactly that loop without the all-reduce.

Sign convention (method §2.4 leaves signs arbitrary): W W^T is positive semi-definite, so a power
step
never flips u (u_new . u_old = ||W^T u_old||^2 / ||z|| >= 0); the sign set at init by the fixed
start vector is carried by the warm start. The start vector is one deterministic D-vector shared
by every expert, so the init is identical under any expert-parallel layout.

Departures: an expert whose W (W^T u) is exactly zero (an all-zero weight) keeps its previous
prototype instead of becoming NaN.

Shape legend: E experts (or a leading batch of layers x experts), D hidden (fc2 out),
F expert ffn (fc2 in, possibly one TP shard).
"""

from __future__ import annotations

import torch

_NORM_EPS = 1e-30


def power_step_partial(weight_EDF: torch.Tensor, protos_ED: torch.Tensor) -> torch.Tensor:
    """Unnormalised power step z_e = W_e (W_e^T u_e) for the local F shard (method §2.4).

    Under expert-TP the caller sums z over the TP group before `normalize`. Leading batch dims
    (e.g. layers) are allowed: weight [..., E, D, F], protos [..., E, D] -> z [..., E, D]. The
    mat-vecs run in the weight's dtype (no upcast copy of W); z comes back in the wider of the two
    dtypes, so an fp32 prototype buffer keeps fp32 vector math under bf16 weights.
    """
    out_dtype = torch.promote_types(weight_EDF.dtype, protos_ED.dtype)
    u_E1D = protos_ED.to(weight_EDF.dtype).unsqueeze(-2)
    y_E1F = torch.matmul(u_E1D, weight_EDF)  # u^T W: reads W in its own layout (no transposed copy)
    return torch.matmul(weight_EDF, y_E1F.transpose(-1, -2)).squeeze(-1).to(out_dtype)


def normalize(z_ED: torch.Tensor, fallback_ED: torch.Tensor | None = None) -> torch.Tensor:
    """Row-normalise z to unit length; rows with ||z|| == 0 take ``fallback`` (or stay zero)."""
    norm_E1 = torch.linalg.vector_norm(z_ED, dim=-1, keepdim=True)
    unit_ED = z_ED / norm_E1.clamp_min(_NORM_EPS)
    if fallback_ED is None:
        return unit_ED
    return torch.where(norm_E1 > 0, unit_ED, fallback_ED.to(unit_ED.dtype))


def power_iteration(
    weight_EDF: torch.Tensor, protos_ED: torch.Tensor, steps: int
) -> torch.Tensor:
    """``steps`` warm-started power steps: u <- normalize(W (W^T u)) (method §2.4).

    Converges to the top left singular vector of each W_e at rate (s2/s1)^2 per step; ``steps`` is a
    static Python int (a fixed unrolled loop, safe for graph capture). Returns protos in the
    dtype of ``protos_ED``; vector math runs in the wider of the weight and prototype dtypes.
    """
    u_ED = protos_ED.to(torch.promote_types(weight_EDF.dtype, protos_ED.dtype))
    for _ in range(steps):
        u_ED = normalize(power_step_partial(weight_EDF, u_ED), fallback_ED=u_ED)
    return u_ED.to(protos_ED.dtype)


def start_vectors(
    num_experts: int,
    dim: int,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Deterministic unit start vector for the init power iteration, shared by all experts.

    A hash of (d, seed) gives pseudo-random entries in [-1/2, 1/2) with no torch.Generator, so the
    same vector comes out on any device, rank or parallel layout and the call is graph-traceable.
    Returns [num_experts, dim] (the same row repeated).
    """
    d_D = torch.arange(dim, device=device, dtype=torch.float64)
    phase_D = torch.sin(d_D * 12.9898 + (seed + 1) * 78.233) * 43758.5453
    v_D = phase_D - torch.floor(phase_D) - 0.5
    v_D = v_D / torch.linalg.vector_norm(v_D)
    return v_D.to(dtype).unsqueeze(0).expand(num_experts, dim).contiguous()


def init_prototypes(weight_EDF: torch.Tensor, steps: int = 30, seed: int = 0) -> torch.Tensor:
    """Prototypes at init: ``steps`` (default 30, method §2.4) power steps from `start_vectors`.

    Returns float32 (or float64 for float64 weights), the dtype of the prototype buffer.

    Only for a whole (un-sharded) W; under expert-TP the caller runs the same loop with an
    all-reduce between `power_step_partial` and `normalize`.
    """
    start_ED = start_vectors(
        weight_EDF.shape[-3], weight_EDF.shape[-2], seed=seed,
        device=weight_EDF.device, dtype=torch.promote_types(weight_EDF.dtype, torch.float32),
    )
    start_ED = start_ED.expand(weight_EDF.shape[:-1])
    return power_iteration(weight_EDF, start_ED, steps)


def align_signs(protos_ED: torch.Tensor, reference_ED: torch.Tensor) -> torch.Tensor:
    """Flip each prototype to point the same way as ``reference`` (sign(u . ref), 0 -> +1).

    For restoring sign continuity after an externally loaded or re-initialised prototype; the
    regular warm-started update never needs it.
    """
    dot_E1 = (protos_ED * reference_ED.to(protos_ED.dtype)).sum(-1, keepdim=True)
    return torch.where(dot_E1 < 0, -protos_ED, protos_ED)

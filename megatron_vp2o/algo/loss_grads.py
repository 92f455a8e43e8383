"""Loss-gradient diagnostic: how large the specialisation losses' gradients are next to the policy
gradient's, per MoE layer (method §2.9, §2.13; issue 21 item 1).

What: from the squared gradient norms of the three terms (orthogonality, routing variance, policy
loss) w.r.t. one layer's router and routed-expert parameters on one micro-batch, summed over ranks
(each rank: its own micro-batch and its own shard of the layer), the root mean square over the
``ranks`` and the division by the step's global loss count N (megatron divides every gradient by N
once, so the norms are in the units of the step's gradient), and the ratios ortho / pg and var / pg.
Why pure: the caller reduces the squares over ranks and reads the result with the step's metrics.

Departures: the spec terms are the layer's own losses only (their effect on earlier layers through
the hidden states is not counted); NaN marks a term that was not measured (off, or a pipeline stage
the policy loss cannot reach) and propagates into its ratio.

Shape legend: L layers; the 3 columns are (ortho, var, pg).
"""

from __future__ import annotations

from typing import Dict

import torch


def loss_grad_norms(
    sq_L3: torch.Tensor, normalizer: float, ranks: int = 1
) -> Dict[str, torch.Tensor]:
    """norm[l, j] = sqrt(sq[l, j] / ranks) / normalizer; ratio_ortho = norm[:, 0] / norm[:, 2],
    ratio_var = norm[:, 1] / norm[:, 2] (inf where the policy gradient is 0 and the term is not)."""
    norms_L3 = torch.sqrt(sq_L3.to(torch.float32) / max(ranks, 1)) / max(float(normalizer), 1e-30)
    pg_L = norms_L3[:, 2]
    return {"ortho": norms_L3[:, 0], "var": norms_L3[:, 1], "pg": pg_L,
            "ratio_ortho": norms_L3[:, 0] / pg_L, "ratio_var": norms_L3[:, 1] / pg_L}

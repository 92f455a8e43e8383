"""VP2O algorithm core: pure torch, no megatron, no torch.distributed (CONTRIBUTING.md §1).

Modules, in the order the method uses them (the method § of docs/method.md in brackets):
- `prototypes`     expert prototypes by warm-started power iteration (2.4)
- `coactivation`   co-activation counts, C, neighbour masks and the active set (2.5, 2.7)
- `kernels`        prototype kernel registry, tau_E = tau0 / log(E + 1) (2.6)
- `stein`          sparse attraction, closed-form repulsion, the transport, textbook SVGD (2.8)
- `specialization` orthogonality and routing-variance losses (2.9)
- `trust_region`   anchor budget, behaviour drift, tempered ESS, refresh rule, decisions (2.10-2.12)
- `grpo`           advantage estimators, policy losses and aggregations (2.2, 2.3)
- `diagnostics`    router entropy, utilisation, overlaps, kernel mass, transport norms (2.13)
- `config`         typed configs with validation (3); `registry` the name -> function helper
Every function takes tensors and static Python scalars and returns tensors (or (loss, metrics)):
no host syncs, no data-dependent Python control flow, static shapes, batched over experts.

Shape legend: E experts, D hidden, F expert ffn, P flattened params, T tokens, K top-k,
B sequences, G group, N particles/sequences, M neighbours.
"""

from . import coactivation, config, diagnostics, grpo, kernels, prototypes, registry
from . import specialization, stein, trust_region
from .config import GRPOConfig, PolicyLossConfig, SpecializationConfig, SteinConfig
from .config import TrustRegionConfig
from .registry import Registry

__all__ = [
    "coactivation", "config", "diagnostics", "grpo", "kernels", "prototypes", "registry",
    "specialization", "stein", "trust_region", "GRPOConfig", "PolicyLossConfig",
    "SpecializationConfig", "SteinConfig", "TrustRegionConfig", "Registry",
]

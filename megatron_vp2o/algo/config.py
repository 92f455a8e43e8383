"""Typed configs for the VP2O algorithm knobs, one dataclass per concern (CONTRIBUTING.md §6).

What: `SteinConfig` (method §2.4-2.8), `TrustRegionConfig` (method §2.10-2.12),
`SpecializationConfig`
(method §2.9) and `PolicyLossConfig` (alias `GRPOConfig`, method §2.2-2.3), with the method §3
defaults. Why: the algorithm functions take explicit scalars; these dataclasses are what YAML and
dotted CLI overrides fill in (under the key in each class's ``SECTION``), and `__post_init__`
rejects a bad value at load time with a ValueError naming the field and the allowed range, e.g.
"stein.repulsion_coef must be >= 0 (got -1)". Names of kernels, advantage estimators, policy
losses and aggregations are checked against their registries.

Departures: ``coact_topm=None`` means K (the router's top-k, known only with the model), resolved
by `SteinConfig.resolved_topm`; ``ess_temper=None`` means the method §3 default of the chosen ESS
level
(0.25 sequence, 1.0 token), resolved by `TrustRegionConfig.resolved_ess_temper`.

Shape legend: none (configs hold scalars).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Tuple

from .grpo import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES
from .kernels import BANDWIDTHS, KERNELS
from .specialization import ORTHO_FORMS
from .trust_region import ON_VIOLATION

ESS_LEVELS = ("sequence", "token")
DEFAULT_ESS_TEMPER = {"sequence": 0.25, "token": 1.0}


def _require(ok: bool, section: str, field: str, rule: str, value: Any) -> None:
    """Raise ValueError("<section>.<field> must be <rule> (got <value>)") unless ``ok``."""
    if not ok:
        raise ValueError(f"{section}.{field} must be {rule} (got {value!r})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_bool(section: str, field: str, value: Any) -> None:
    _require(isinstance(value, bool), section, field, "a bool", value)


@dataclass
class SteinConfig:
    """Stein transport of expert gradients and prototype upkeep (method §2.4-2.8)."""

    SECTION: ClassVar[str] = "stein"

    #: Apply the Stein transport (False = plain GRPO gradients).
    enabled: bool = True
    #: Prototype kernel name, one of the `kernels.KERNELS` registry (method §2.6).
    kernel: str = "sq_cos"
    #: Kernel base temperature tau0; tau_E = tau0 / log(E + 1) (method §2.6; bandwidth "fixed").
    kernel_tau0: float = 1.0
    #: Kernel bandwidth rule (`kernels.BANDWIDTHS`): "fixed" (tau_E above) or "median" (SVGD's
    #: median heuristic, h = median off-diagonal distance / log(E + 1), per layer and step). The
    #: default by the kernel spread on the tiny recipe (issue 21): off-diagonal max/min k 4.8 vs
    #: 3.8 for "fixed", attraction still changing the gradient by 23% (29% for "fixed").
    kernel_bandwidth: str = "median"
    #: Kernel sharpness s: tau is divided by s (1 = the bandwidth rule as stated).
    kernel_sharpness: float = 1.0
    #: Attraction among co-active neighbours (method §2.8). False removes exactly that term: each
    #: active expert keeps its own gradient (plus the repulsion), the co-active / inactive sets
    #: (and so the repellers) stay as they are.
    attraction: bool = True
    #: Repulsion weight alpha on dR_i/dW_i (method §2.8); 0 disables the repulsion.
    repulsion_coef: float = 0.01
    #: Co-active neighbours m per expert (method §2.7); None = the router's top-k K.
    coact_topm: Optional[int] = None
    #: Warm-started power-iteration steps after every optimizer step (method §2.4).
    power_iters: int = 2
    #: Power-iteration steps from the fixed start vector at initialisation (method §2.4).
    init_power_iters: int = 30
    #: Restore parameters and optimizer moments of experts with no routed token (method §2.8).
    freeze_inactive: bool = True

    def __post_init__(self) -> None:
        s = self.SECTION
        _require_bool(s, "enabled", self.enabled)
        _require_bool(s, "attraction", self.attraction)
        KERNELS.check(self.kernel, f"{s}.kernel")
        _require(_is_number(self.kernel_tau0) and self.kernel_tau0 > 0, s, "kernel_tau0", "> 0",
                 self.kernel_tau0)
        _require(self.kernel_bandwidth in BANDWIDTHS, s, "kernel_bandwidth",
                 f"one of {{{', '.join(BANDWIDTHS)}}}", self.kernel_bandwidth)
        _require(_is_number(self.kernel_sharpness) and self.kernel_sharpness > 0, s,
                 "kernel_sharpness", "> 0", self.kernel_sharpness)
        _require(_is_number(self.repulsion_coef) and self.repulsion_coef >= 0, s,
                 "repulsion_coef", ">= 0", self.repulsion_coef)
        _require(self.coact_topm is None or (_is_int(self.coact_topm) and self.coact_topm >= 0),
                 s, "coact_topm", "None or an int >= 0", self.coact_topm)
        _require(_is_int(self.power_iters) and self.power_iters >= 1, s, "power_iters",
                 "an int >= 1", self.power_iters)
        _require(_is_int(self.init_power_iters) and self.init_power_iters >= 1, s,
                 "init_power_iters", "an int >= 1", self.init_power_iters)
        _require_bool(s, "freeze_inactive", self.freeze_inactive)

    def kernel_args(self) -> dict:
        """The kernel keyword arguments of `kernels.prototype_kernel` and the repulsion."""
        return {"tau0": self.kernel_tau0, "form": self.kernel,
                "bandwidth": self.kernel_bandwidth, "sharpness": self.kernel_sharpness}

    def resolved_topm(self, top_k: int) -> int:
        """m for a router with top-k ``top_k``: ``coact_topm`` or K when None."""
        return top_k if self.coact_topm is None else self.coact_topm


@dataclass
class TrustRegionConfig:
    """Anchor and behaviour budgets and the refresh rule (method §2.10-2.12)."""

    SECTION: ClassVar[str] = "trust_region"

    #: Check the budgets and refresh by rule (False = refresh every rollout batch, as GRPO).
    enabled: bool = True
    #: Anchor prototype budget delta_anc on D_anc, which lies in [0, 2] (method §2.10).
    anchor_delta: float = 0.1
    #: What to do when D_anc > delta_anc: backtrack, reject or refresh (method §2.10).
    on_violation: str = "backtrack"
    #: Scales of the parameter change tried in turn when backtracking (method §2.10).
    backtrack_scales: Tuple[float, ...] = (0.5, 0.25, 0.125)
    #: Behaviour drift budget delta_drift on mean k3 KL(mu || pi) (method §2.11).
    drift_delta: float = 0.02
    #: Refresh when the normalised ESS falls below eta_ess (method §2.12).
    ess_min: float = 0.5
    #: ESS tempering kappa; None = 0.25 for sequence level, 1.0 for token level (method §2.11).
    ess_temper: Optional[float] = None
    #: Importance weights per sequence or per token for the ESS (method §2.11).
    ess_level: str = "sequence"
    #: Force a refresh after this many learner steps on one rollout buffer (method §2.12).
    max_steps_per_refresh: int = 8
    #: Where the pre-step snapshot (main params + optimizer state) lives: device, or host (pinned
    #: host memory, copied asynchronously; on a CPU-only machine the same memory as device).
    snapshot: str = "device"
    #: Gates D_anc is computed with (method §2.10): "post_step" re-routes the step's tokens with the
    #: post-step weights (one forward-only pass per attempt, the step judged by its own routing);
    #: "pre_step" reuses the gates of the step's forward (no extra pass; router drift of the step
    #: itself is not seen until the next step).
    anchor_gates: str = "post_step"
    #: Micro-batches D_anc is measured on (method §2.10): 0 = all of the step's; n = the first n of
    #: them, for the anchor's capture and the post-step re-route alike (an unbiased estimate of the
    #: token mean, at n / all of the re-route's forward cost; docs/method.md).
    anchor_micro_batches: int = 0

    def __post_init__(self) -> None:
        s = self.SECTION
        _require(_is_int(self.anchor_micro_batches) and self.anchor_micro_batches >= 0, s,
                 "anchor_micro_batches", "an int >= 0 (0: all of the step's micro-batches)",
                 self.anchor_micro_batches)
        _require_bool(s, "enabled", self.enabled)
        _require(self.anchor_gates in ("post_step", "pre_step"), s, "anchor_gates",
                 "post_step or pre_step", self.anchor_gates)
        _require(_is_number(self.anchor_delta) and 0 < self.anchor_delta <= 2, s,
                 "anchor_delta", "in (0, 2]", self.anchor_delta)
        _require(self.on_violation in ON_VIOLATION, s, "on_violation",
                 f"one of {{{', '.join(ON_VIOLATION)}}}", self.on_violation)
        self.backtrack_scales = tuple(self.backtrack_scales)
        _require(all(_is_number(x) and 0 < x < 1 for x in self.backtrack_scales), s,
                 "backtrack_scales", "a list of numbers in (0, 1)", self.backtrack_scales)
        _require(self.on_violation != "backtrack" or len(self.backtrack_scales) > 0, s,
                 "backtrack_scales", "non-empty when on_violation is backtrack",
                 self.backtrack_scales)
        _require(_is_number(self.drift_delta) and self.drift_delta > 0, s, "drift_delta", "> 0",
                 self.drift_delta)
        _require(_is_number(self.ess_min) and 0 <= self.ess_min <= 1, s, "ess_min",
                 "in [0, 1]", self.ess_min)
        _require(self.ess_temper is None or (_is_number(self.ess_temper) and self.ess_temper > 0),
                 s, "ess_temper", "None or > 0", self.ess_temper)
        _require(self.ess_level in ESS_LEVELS, s, "ess_level", "one of {sequence, token}",
                 self.ess_level)
        _require(self.snapshot in ("device", "host"), s, "snapshot", "one of {device, host}",
                 self.snapshot)
        _require(_is_int(self.max_steps_per_refresh) and self.max_steps_per_refresh >= 1, s,
                 "max_steps_per_refresh", "an int >= 1", self.max_steps_per_refresh)

    def resolved_ess_temper(self) -> float:
        """kappa: ``ess_temper`` or the default of ``ess_level`` when None."""
        if self.ess_temper is None:
            return DEFAULT_ESS_TEMPER[self.ess_level]
        return float(self.ess_temper)


@dataclass
class SpecializationConfig:
    """Expert specialisation losses (method §2.9)."""

    SECTION: ClassVar[str] = "specialization"

    #: Weight of the top-k output orthogonality loss; 0 disables it.
    ortho_coef: float = 1e-4
    #: Weight of the routing variance loss; 0 disables it.
    var_coef: float = 1e-3
    #: Orthogonality form: "projection" (method §2.9, grows with |x|^2) or "cosine" (scale-free).
    ortho_form: str = "projection"

    def __post_init__(self) -> None:
        s = self.SECTION
        for field in ("ortho_coef", "var_coef"):
            value = getattr(self, field)
            _require(_is_number(value) and value >= 0, s, field, ">= 0", value)
        _require(self.ortho_form in ORTHO_FORMS, s, "ortho_form", "one of {projection, cosine}",
                 self.ortho_form)


@dataclass
class PolicyLossConfig:
    """Advantages and the policy-gradient surrogate (method §2.2-2.3), shared by both algorithms.
    The PPO clip range is each algorithm's own setting (``rl.grpo.clip_eps``, ``rl.vp2o.clip_eps``
    in the ``rl`` config), passed to the loss as ``clip_eps``."""

    SECTION: ClassVar[str] = "policy_loss"

    #: Advantage estimator, one of `grpo.ADVANTAGES` (grpo, dr_grpo, rloo).
    advantage: str = "grpo"
    #: VP2O's policy loss, one of `grpo.POLICY_LOSSES` (vp2o, grpo_clip); GRPO runs grpo_clip.
    policy_loss: str = "vp2o"
    #: Weight beta_kl of the k3 KL(pi || pi_ref) penalty; 0 needs no reference model.
    kl_coef: float = 0.0
    #: Responses per prompt G (the GRPO group).
    group_size: int = 8
    #: Loss aggregation, one of `grpo.AGGREGATIONS` (method §2.2).
    aggregation: str = "seq_mean_token_mean"
    #: eps added to the group std in the grpo advantage (method §2.2).
    adv_eps: float = 1e-6

    def __post_init__(self) -> None:
        s = self.SECTION
        ADVANTAGES.check(self.advantage, f"{s}.advantage")
        POLICY_LOSSES.check(self.policy_loss, f"{s}.policy_loss")
        _require(_is_number(self.kl_coef) and self.kl_coef >= 0, s, "kl_coef", ">= 0",
                 self.kl_coef)
        _require(_is_int(self.group_size) and self.group_size >= 2, s, "group_size",
                 "an int >= 2", self.group_size)
        AGGREGATIONS.check(self.aggregation, f"{s}.aggregation")
        _require(_is_number(self.adv_eps) and self.adv_eps > 0, s, "adv_eps", "> 0",
                 self.adv_eps)


#: GRPO and VP2O share one policy-loss config; the name the issue also uses.
GRPOConfig = PolicyLossConfig

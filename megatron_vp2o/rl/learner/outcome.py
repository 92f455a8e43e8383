"""The learner interface of the RL loop: ``Learner.step(batches, anchors) -> StepOutcome``.

GRPO (``rl.learner.grpo``) and VP2O (``rl.learner.vp2o``) learners both take the buffer's
micro-batches and the anchors captured at the last refresh, and return one declared
:class:`StepOutcome`: what the trainer acts on (``skipped``, ``anchor_failed``: the anchor budget
verdict the refresh rule reads, method §2.12), what it logs (``logged()``), and the D_anc values of the
trust-region loop (method §2.10). The trainer never reads a learner's metric names to decide anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from megatron_vp2o.algo import trust_region as tr

# Keys of a learner's raw metrics that become StepOutcome fields rather than logged metrics.
_FIELDS = ("loss", "skipped", "skip_reason", "d_anc_trace")


@dataclass
class StepOutcome:
    """One learner update (all optimizer steps a learner makes on the buffer in one RL step)."""

    loss: float  # the policy loss (GRPO: averaged over its non-skipped optimizer steps); NaN if none
    skipped: bool = False  # a non-finite advantage, loss or gradient: the weights did not change
    skip_reason: str | None = None
    decision: int = tr.ACCEPT  # algo.trust_region decision code of the anchor budget (GRPO: ACCEPT)
    d_anc_trace: list[float] = field(default_factory=list)  # D_anc per attempt (full step, backtracks)
    metrics: dict = field(default_factory=dict)  # namespaced metrics, logged as they are

    @property
    def anchor_failed(self) -> bool:
        """The update failed its anchor budget (REJECT or REFRESH): the refresh rule refreshes."""
        return bool(tr.forces_refresh(torch.tensor(self.decision, device="cpu")))

    def logged(self) -> dict:
        """The metrics row of this update: ``loss``, the learner's metrics, ``skipped`` and
        ``skip_reason`` when it was skipped."""
        out = {"loss": self.loss} | self.metrics
        if self.skipped:
            out |= {"skipped": True, "skip_reason": self.skip_reason}
        return out

    @classmethod
    def from_metrics(cls, raw: dict, prefix: str, decision: int = tr.ACCEPT) -> "StepOutcome":
        """From a step function's flat metrics: the outcome fields taken out, the other keys
        namespaced under ``prefix/`` unless they already name a namespace (``timing/x``)."""
        metrics = {(k if "/" in k else f"{prefix}/{k}"): v for k, v in raw.items() if k not in _FIELDS}
        return cls(loss=raw.get("loss", math.nan), skipped=bool(raw.get("skipped", False)),
                   skip_reason=raw.get("skip_reason"), decision=decision,
                   d_anc_trace=list(raw.get("d_anc_trace", [])), metrics=metrics)


class Learner(Protocol):
    """What the RL loop needs from a learner (GRPOLearner, VP2OLearner)."""

    forward_step: object  # the megatron forward step of the policy loss (rl.learner.forward)

    def anchors(self, batches: list) -> list | None:
        """The anchors of a new buffer (VP2O: routing + prototypes of the current model); None."""

    def step(self, batches: list, anchors: list | None) -> StepOutcome:
        """Update the policy on the buffer's micro-batches; ``anchors`` None skips the anchor budget."""

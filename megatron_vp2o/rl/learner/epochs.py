"""The mini-batch epochs of one learner update, for any optimizer step (method §2.3).

``loop.epochs`` passes of ``loop.mini_batches`` optimizer steps over the rollout buffer, whole prompt
groups per mini-batch, in buffer order (verl's GRPO loop), where ``loop`` is the chosen algorithm's
section of the ``rl`` config (``rl.grpo`` or ``rl.vp2o``), and the summary of those steps: the loss
averaged over the steps that were applied, skipped steps counted. The GRPO learner runs it with
megatron's plain step (``training.step.train_step``); the VP2O learner with VP2O steps when
``rl.vp2o`` asks for more than one step per update (so VP2O with every part off runs exactly
GRPO's loop: the parity anchor of the two learners).
"""

from __future__ import annotations

from typing import Callable

from megatron_vp2o.rl.batches import mini_batches


def epoch_steps(step: Callable[[list], dict], batches: list, loop, group_size: int) -> list[dict]:
    """``step(micro_batches) -> metrics`` once per mini-batch and epoch, in order."""
    minis = mini_batches(batches, loop.mini_batches, group_size)
    return [step(mb) for _ in range(loop.epochs) for mb in minis]


def applied(outs: list[dict]) -> list[dict]:
    """The steps that changed the weights (all of them when none did)."""
    return [o for o in outs if not o.get("skipped")] or outs


def mean_of(outs: list[dict], keys: tuple[str, ...]) -> dict:
    """Each key's mean over ``outs`` (keys some step lacks are left out)."""
    return {k: sum(o[k] for o in outs) / len(outs) for k in keys if all(k in o for o in outs)}


def skip_summary(outs: list[dict]) -> dict:
    """``optimizer_steps`` and ``skipped_minibatches``; the update counts as skipped when every step was."""
    skipped = sum(1 for o in outs if o.get("skipped"))
    out = {"optimizer_steps": len(outs), "skipped_minibatches": skipped}
    if skipped == len(outs):
        out |= {"skipped": True, "skip_reason": outs[0].get("skip_reason")}
    return out

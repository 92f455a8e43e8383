"""The RL loop's state (``LoopState``) and how it is checkpointed.

What is saved follows from the declaration, not from hand-written lists: every field of
``LoopState`` is either a scalar of the checkpoint's ``extra`` (the default), per-rank state
(``metadata={"save": "rank"}``: the rollout buffer and its anchors, saved with each rank's state
file) or step-local (``metadata={"save": None}``: the phase timings). The ``extra`` keys are the
field names, so a checkpoint written before this module existed resumes unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_vp2o.monitor.timing import timed
from megatron_vp2o.rl.actor import ActorBatch

_RANK = {"save": "rank"}
_NOT_SAVED = {"save": None}


@dataclass
class LoopState:
    step: int = 0
    refreshes: int = 0
    steps_since_refresh: int = 0  # learner updates on the current buffer (the one step counter)
    next_refresh: str | None = "start"  # the reason the next step refreshes (None: it keeps the buffer)
    forced: bool = False  # the buffer is unusable (non-finite advantages): refresh whatever the rule says
    anchor_failed: bool = False  # the last update failed the anchor budget (reject / refresh decision)
    skipped: int = 0
    samples: int = 0  # training responses generated (all ranks)
    tokens: int = 0  # their response tokens
    elapsed_s: float = 0.0  # wall-clock of the RL loop, summed over resumed segments
    buffer: ActorBatch | None = field(default=None, metadata=_RANK)
    anchors: list | None = field(default=None, metadata=_RANK)
    timing: dict = field(default_factory=dict, metadata=_NOT_SAVED)


def _saved(kind: str | None) -> list[str]:
    return [f.name for f in dataclasses.fields(LoopState) if f.metadata.get("save", "extra") == kind]


def loop_extra(state: LoopState) -> dict:
    """The scalar fields, for the checkpoint's ``extra`` (keys: the field names)."""
    return {name: getattr(state, name) for name in _saved("extra")}


def loop_rank_state(state: LoopState) -> dict:
    """The per-rank fields (buffer, anchors), for each rank's state file."""
    return {name: getattr(state, name) for name in _saved("rank")}


def restore_loop(state: LoopState, extra: dict, rank_state: dict) -> LoopState:
    """``state`` with the saved scalars (every one required) and per-rank fields (None when absent)."""
    for name in _saved("extra"):
        setattr(state, name, extra[name])
    for name in _saved("rank"):
        setattr(state, name, rank_state.get(name))
    return state


def phase(state: LoopState, name: str):
    """Time a phase of the step into ``state.timing["timing/<name>"]``."""
    return timed(state.timing, name)

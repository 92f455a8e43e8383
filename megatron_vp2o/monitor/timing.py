"""Wall-clock phases: one context manager for every ``timing/<phase>`` metric.

The RL loop (``rl.trainer.phase``) and the VP2O learner step (``rl.learner.vp2o``) time their
phases with :func:`timed`, so every logged timing means the same thing: host wall-clock seconds
from entering to leaving the block, summed when a phase runs more than once in a step. No device
synchronisation: on CUDA a phase that only queues kernels is charged to the phase that waits.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def timed(sink: dict, name: str):
    """Add the seconds spent in the block to ``sink["timing/<name>"]`` (also when it raises)."""
    key = f"timing/{name}"
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sink[key] = sink.get(key, 0.0) + time.perf_counter() - t0

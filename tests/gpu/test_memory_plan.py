"""Issue 19: `vp2o plan` against the GPU's own count. One tiny VP2O and one GRPO-shaped learner step on
CUDA: torch.cuda.max_memory_allocated over the plan's peak, printed as a ratio (make gpu-check runs
tests/gpu; the figures reach its table). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from gpu.test_gpu_rl import report
from harness import run_world

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_max_memory_allocated_against_the_plan():
    got = run_world(1, "gpu.worlds_memory:measure", {}, timeout_s=300)
    for algo, r in got.items():
        ratio = r["measured"] / max(r["plan"], 1)
        print(f"memory {algo}: max_memory_allocated {r['measured'] / 2**20:.1f} MiB, plan peak "
              f"{r['plan'] / 2**20:.1f} MiB, ratio {ratio:.2f}")
        report(f"memory {algo}: max_memory_allocated vs plan peak", measured_mib=r["measured"] / 2**20,
               plan_mib=r["plan"] / 2**20, ratio=ratio)
        # the plan leaves out the allocator's rounding and megatron's small buffers: within 2x on a
        # tiny model (at 33B they are noise next to the rows)
        assert 0.25 < ratio < 2.0, (algo, r)
    report("memory vp2o / grpo (measured)", ratio=got["vp2o"]["measured"] / max(got["grpo"]["measured"], 1))

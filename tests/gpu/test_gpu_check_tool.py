"""Contract: `make gpu-check` (tools/gpu_check.py) skips cleanly without CUDA, in one line that says
why, lists what it would run, and exits 0; `--list` lists the plan anywhere. Runs everywhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_skips_with_one_line_reason_and_lists_the_plan(capsys, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tool.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gpu-check: skipped: no CUDA device"), lines
    assert lines[1] == "gpu-check would run:"
    listed = "\n".join(lines[2:])
    assert "pytest tests/gpu" in listed and "bench/bench_step.py" in listed


def test_plan_covers_each_gpu_test_module():
    tool = _tool()
    assert any("tests/gpu" in cmd for _, cmd in tool.PLAN)
    modules = {p.name for p in (ROOT / "tests" / "gpu").glob("test_*.py")}
    assert {"test_gpu_rl.py", "test_stein_cuda_graph.py", "test_gpu_foundation.py"} <= modules

"""`make gpu-check`: the GPU acceptance check, one command, one table.

Run it on a machine with a CUDA GPU (one H100/H200 is enough; under 8 minutes) after changing
anything that touches devices, megatron-core's layers, the Stein hook or the rollout engine, and
before a release. It runs:

1. ``pytest tests/gpu``: the platform layer stays off with CUDA; foundation parity on NCCL for the
   layouts the GPUs allow; `vp2o train` of the tiny recipe on one GPU in fp32 and bf16 (reward
   rises, no skipped step); the same under ``torchrun --nproc-per-node 1`` (NCCL); rollouts on CUDA
   whose log-probs equal a teacher-forced forward; the Transformer Engine spec (``te_grouped``)
   building the tiny model with SFT steps and a VP2O step; CUDA-graph capture and replay of the
   Stein hook's tensor work; ``torch.cuda.max_memory_allocated`` of a tiny VP2O and GRPO
   learner step against `vp2o plan`'s peak, printed as a ratio (tests/gpu/test_memory_plan.py);
2. ``bench/bench_step.py --quick`` on the GPU: the VP2O / GRPO learner-step ratio and the model
   FLOP utilisation of each.

and prints a table of pass / fail / skip with the figures each check reported. Without CUDA it
prints one line saying so, lists what it would run, and exits 0.

    python tools/gpu_check.py [--list] [--timeout S] [--test-timeout S] [--log DIR]

``--log DIR`` keeps each step's whole output (``DIR/<step>.log``) beside the table. In an image that
already holds torch and megatron-core (NGC PyTorch), ``make gpu-check PY=python3`` uses that python
without building the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = [
    ("pytest tests/gpu", [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-rs"]),
    ("bench_step on the GPU", [sys.executable, "bench/bench_step.py", "--quick"]),
]


def cuda_reason() -> str | None:
    """None when a CUDA device is usable, else why not (one line)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def child_env(**extra: str) -> dict:
    """The environment of a step: the repository first on PYTHONPATH, what was there kept after it
    (an image whose packages live on PYTHONPATH still finds them)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def keep_log(log_dir: Path | None, name: str, proc_or_exc) -> None:
    if log_dir is None:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = (getattr(proc_or_exc, k, None) or "" for k in ("stdout", "stderr"))
    out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    (log_dir / f"{name}.log").write_text(f"{out}\n--- stderr ---\n{err}")


def run_pytest(cmd: list[str], timeout: float, test_timeout: float = 0,
               log_dir: Path | None = None) -> list[tuple[str, str, str]]:
    """(check, status, figures) per test of tests/gpu, from pytest's junit XML and the report file.
    ``test_timeout`` (s, pytest-timeout) fails one hung test and lets the others run."""
    with tempfile.TemporaryDirectory() as tmp:
        xml, figures = Path(tmp) / "junit.xml", Path(tmp) / "figures.jsonl"
        env = child_env(VP2O_GPU_REPORT=str(figures))
        per_test = [f"--timeout={test_timeout:.0f}"] if test_timeout > 0 else []
        try:
            proc = subprocess.run([*cmd, *per_test, f"--junitxml={xml}"], cwd=ROOT, env=env,
                                  timeout=timeout, capture_output=True, text=True)
            keep_log(log_dir, "pytest_gpu", proc)
            tail = proc.stdout[-2000:] + proc.stderr[-2000:]
        except subprocess.TimeoutExpired as exc:
            keep_log(log_dir, "pytest_gpu", exc)
            return [("pytest tests/gpu", "FAIL", f"timed out after {timeout:.0f} s")]
        rows = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = case.get("name", "?")
                status = "pass"
                if case.find("failure") is not None or case.find("error") is not None:
                    status = "FAIL"
                elif case.find("skipped") is not None:
                    status = "skip: " + (case.find("skipped").get("message") or "")[:60]
                rows.append((name, status, f"{float(case.get('time', 0)):.1f} s"))
        else:
            rows.append(("pytest tests/gpu", "FAIL", tail[-300:]))
        if figures.exists():
            for line in figures.read_text().splitlines():
                rec = json.loads(line)
                check = rec.pop("check")
                rows.append((f"  figures: {check}", "",
                             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())))
        return rows


def run_bench(cmd: list[str], timeout: float, log_dir: Path | None = None) -> list[tuple[str, str, str]]:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True, env=child_env())
        keep_log(log_dir, "bench_step", proc)
    except subprocess.TimeoutExpired as exc:
        keep_log(log_dir, "bench_step", exc)
        return [("bench_step", "FAIL", f"timed out after {timeout:.0f} s")]
    out = proc.stdout
    ratio = re.search(r"ratio vp2o/grpo ([0-9.]+)", out)
    mfus = re.findall(r"^mfu (\w+) ([0-9.]+) \(([^)]*)\)", out, re.M)
    if proc.returncode != 0 or ratio is None:
        return [("bench_step", "FAIL", (proc.stderr or out)[-300:])]
    figures = [f"ratio vp2o/grpo {ratio.group(1)}"] + [f"MFU {name} {float(v):.4f} ({what})" for name, v, what in mfus]
    return [("bench_step (learner step, tiny model)", "pass", "; ".join(figures))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU acceptance check (see the module docstring)")
    parser.add_argument("--list", action="store_true", help="print what would run and exit")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per step of the plan")
    parser.add_argument("--test-timeout", type=float, default=0,
                        help="seconds per GPU test (pytest-timeout; 0: none): a hung test fails alone")
    parser.add_argument("--log", type=Path, default=None, help="folder for each step's whole output")
    args = parser.parse_args(argv)
    reason = cuda_reason()
    if args.list or reason:
        if reason:
            print(f"gpu-check: skipped: {reason}; run it on a machine with a CUDA GPU (H100/H200)")
        print("gpu-check would run:")
        for name, cmd in PLAN:
            print(f"  {name}: {' '.join(Path(c).name if c == sys.executable else c for c in cmd)}")
        return 0
    start, rows = time.time(), []
    for name, cmd in PLAN:
        if cmd[2:4] == ["pytest", "tests/gpu"]:
            rows += run_pytest(cmd, args.timeout, args.test_timeout, args.log)
        else:
            rows += run_bench(cmd, args.timeout, args.log)
    import torch

    print(f"\n## gpu-check on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"{time.time() - start:.0f} s)\n")
    print("| check | result | figures |\n|---|---|---|")
    for name, status, figures in rows:
        print(f"| {name} | {status} | {figures} |")
    failed = [r for r in rows if r[1] == "FAIL"]
    print(f"\n{len([r for r in rows if r[1] == 'pass'])} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

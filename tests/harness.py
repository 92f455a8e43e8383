"""Run a function on N real ranks (torchrun + gloo) from a pytest test.

``run_world(n, "module:function", payload, timeout_s)`` launches ``torchrun --nproc-per-node n``
on a free port; every rank imports ``module`` (from tests/), calls ``function(payload)`` after the
platform is activated, and rank 0's return value (anything ``torch.save`` can write) comes back.
A world that exceeds ``timeout_s`` has its whole process group killed, and the error shows every
rank's output tail. Start-up costs ~5-10 s (megatron-core import), so a test module launches each
world once (module-scoped fixture) and runs several checks inside it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorldFailed(AssertionError):
    pass


def run_world(nproc: int, target: str, payload=None, timeout_s: float = 300, env: dict | None = None):
    """Run ``target`` (``"module:function"``) on ``nproc`` ranks; returns rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="vp2o-world-") as tmp:
        tmp = Path(tmp)
        torch.save(payload, tmp / "payload.pt")
        log = tmp / "log"
        log.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "--master-addr=127.0.0.1", "--redirects=3", f"--log-dir={log}",
               "--tee=0", str(ROOT / "tests" / "world_worker.py"), target, str(tmp)]
        full_env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1",
                        PYTHONWARNINGS="ignore", **(env or {}))
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(ROOT))
        try:
            out, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            timed_out = True
        if timed_out or proc.returncode != 0:
            raise WorldFailed(_report(target, nproc, timed_out, proc.returncode, out, log, timeout_s))
        return torch.load(tmp / "result.pt", weights_only=False)


def _report(target, nproc, timed_out, rc, out, log: Path, timeout_s) -> str:
    head = f"world {target} x{nproc} " + (f"timed out after {timeout_s}s (killed)" if timed_out else f"failed rc={rc}")
    parts = [head, "--- torchrun ---", out.decode(errors="replace")[-3000:]]
    for path in sorted(log.rglob("*.log")):
        text = path.read_text(errors="replace")
        if text.strip():
            parts += [f"--- {path.relative_to(log)} ---", text[-4000:]]
    return "\n".join(parts)

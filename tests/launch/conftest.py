"""The local slurm for tests/launch (one per session, started only when a test asks for it)."""

import os
import sys
from pathlib import Path

import pytest

from launch import local_slurm

ROOT = Path(__file__).resolve().parents[2]


def job_env(base: dict) -> dict:
    """What jobs and launchers need: this interpreter's bin dir first on PATH (vp2o, torchrun)."""
    bindir = os.path.dirname(sys.executable)
    return dict(base, PATH=f"{bindir}{os.pathsep}{base.get('PATH', '')}", OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore", WANDB_MODE="offline", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    try:
        cluster = local_slurm.start(tmp_path_factory.mktemp("slurm"))
    except local_slurm.Unavailable as exc:
        pytest.skip(f"local slurm unavailable: {exc}")
    cluster.env = job_env(cluster.env)
    yield cluster
    cluster.stop()

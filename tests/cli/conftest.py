"""Fixtures for the CLI error tests: the repo root as cwd, a platform layer that must not be reached,
and small checkpoints (metadata only) of the tiny model or of another model."""

import copy
import json
import shutil
from pathlib import Path

import pytest

from harness import ROOT

TINY = "examples/configs/tiny_cpu.yaml"
POLICY = ROOT / "checkpoints" / "tiny_policy"


class PlatformReached(AssertionError):
    """Validation let a bad input through to the platform layer (megatron, process groups)."""


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def no_platform(monkeypatch):
    """Every case here must fail before the platform layer starts: reaching it fails the test."""
    from megatron_vp2o import platform

    def activate(*args, **kwargs):
        raise PlatformReached("bad input reached platform.activate()")

    monkeypatch.setattr(platform, "activate", activate)


def saved_config() -> dict:
    found = POLICY / (POLICY / "latest").read_text().strip()
    return json.loads((found / "vp2o.json").read_text())


def fake_checkpoint(root: Path, model_changes: dict | None = None, step: int = 1, meta: dict | None = None,
                    with_tensors: bool = False) -> Path:
    """A checkpoint directory holding vp2o.json (what the pre-flight reads) and a 'latest' marker;
    ``with_tensors``: also the shipped policy's dist-checkpoint files (.metadata, *.distcp, common.pt)."""
    meta = copy.deepcopy(meta or saved_config())
    meta["config"]["model"].update(model_changes or {})
    found = root / f"iter_{step:07d}"
    if with_tensors:
        shutil.copytree(POLICY / (POLICY / "latest").read_text().strip(), found)
    found.mkdir(parents=True, exist_ok=True)
    (found / "vp2o.json").write_text(json.dumps(meta))
    (root / "latest").write_text(found.name)
    return found


def run_cli(argv, capsys):
    """``vp2o ARGV`` in-process: (exit code, stderr lines)."""
    from megatron_vp2o.cli.main import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()

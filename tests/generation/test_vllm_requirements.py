"""Contract: tools/vllm_requirements.py (the Dockerfile's vLLM install under the image's own torch)
lists a distribution's requirements with the torch family removed and markers evaluated: run on
megatron-core's metadata, torch (its one hard requirement of that family) is gone, numpy and
packaging stay, and no extra-only requirement leaks in."""

import subprocess
import sys

from packaging.requirements import Requirement

from e2e.test_sft import ROOT


def test_megatron_core_requirements_without_torch():
    out = subprocess.run([sys.executable, "tools/vllm_requirements.py", "megatron-core"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    names = {Requirement(line).name.lower() for line in out if line}
    assert {"numpy", "packaging"} <= names
    assert "torch" not in names
    assert "transformer-engine" not in names and "wandb" not in names  # extra == "dev" / "mlm" only

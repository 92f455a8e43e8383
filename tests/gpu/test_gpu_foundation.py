"""Contract (CUDA only): with a GPU the platform layer stays inactive, and the foundation's parity
protocol passes on NCCL for every layout the machine has enough GPUs for."""

from __future__ import annotations

import pytest
import torch

from harness import run_world

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _platform(payload):
    from megatron_vp2o import platform

    plat = platform.activate()
    return {"backend": plat.backend, "cpu_layer": plat.cpu_layer, "current_device": str(torch.cuda.current_device())}


def test_platform_layer_inactive_with_cuda():
    res = run_world(1, "gpu.test_gpu_foundation:_platform", None)
    assert res["backend"] == "nccl" and res["cpu_layer"] is False and res["current_device"] == "0"


@pytest.mark.parametrize("name", ["dp2", "ep2", "ep4", "dp2xep2", "tp2_sp", "pp2", "tp2xep2"])
def test_parity_on_gpu(tmp_path, name):
    from distributed.test_parity import LAYOUTS

    ranks, parallel = LAYOUTS[name]
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs")
    init, ref = str(tmp_path / "init"), str(tmp_path / "ref")
    reference = run_world(1, "distributed.worlds_foundation:reference", {"init": init, "ref": ref})
    result = run_world(ranks, "distributed.worlds_foundation:layout_step",
                       {"init": init, "out": str(tmp_path / name), "parallel": parallel})
    compared = run_world(1, "distributed.worlds_foundation:compare", {"ref": ref, "layouts": {name: str(tmp_path / name)}})
    assert reference["bitwise_repeat"]
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert compared[name]["max_param_diff"] < 1e-4

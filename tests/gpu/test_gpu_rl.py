"""Contract (CUDA only; `make gpu-check` runs these): what only a GPU shows.

- `vp2o train` of the tiny recipe on one GPU, fp32 and bf16: exits 0, no skipped step, the eval
  reward at the end is above the start, and every logged number is finite;
- the same under ``torchrun --nproc-per-node 1`` (NCCL process group);
- rollouts on CUDA: cached decoding's logged log-probs equal a teacher-forced forward's;
- the Transformer Engine spec (``expert_impl: te_grouped``) builds the tiny model, takes SFT steps
  and a VP2O step.
Figures go to the JSON-lines file named by ``VP2O_GPU_REPORT`` (tools/gpu_check.py prints them).
Skipped without CUDA (the whole module), and the TE test also without Transformer Engine.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from harness import run_world

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY = "examples/configs/tiny_cpu.yaml"


def report(name: str, **figures) -> None:
    path = os.environ.get("VP2O_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": name, **figures}) + "\n")


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _eval_curve(records) -> list[float]:
    return [r["eval/mean"] for r in records if "eval/mean" in r]


def _all_finite(records) -> bool:
    return all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_tiny_recipe_on_one_gpu(tmp_path, dtype):
    from e2e.test_sft import vp2o

    out = tmp_path / "run"
    proc = vp2o(["train", "--config", TINY, "--out", str(out), "rl.steps=30", "logging.progress=false",
                 f"model.params_dtype={dtype}"], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    evals = _eval_curve(records)
    skipped = sum(1 for r in records if r.get("skipped"))
    report(f"train tiny 1 GPU {dtype}", eval_start=evals[0], eval_end=evals[-1], skipped=skipped,
           steps=len([r for r in records if "loss" in r]))
    assert skipped == 0 and _all_finite(records)
    assert evals[-1] > evals[0], evals


def test_train_under_torchrun_with_nccl(tmp_path):
    import subprocess
    import sys

    from e2e.test_sft import ROOT
    from harness import free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
           "-m", "megatron_vp2o.cli.main", "train", "--config", TINY, "--out", str(out), "rl.steps=6",
           "logging.progress=false", "rl.eval_prompts=null"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    report("torchrun 1 GPU NCCL", steps=len(records), skipped=sum(1 for r in records if r.get("skipped")))
    assert records and _all_finite(records) and not any(r.get("skipped") for r in records)


def _rollout_on_cuda(payload):
    import generation.worlds_rollout as w
    from megatron_vp2o.device import device
    from megatron_vp2o.generation import SamplingConfig

    model = w.build()
    parity = w.cache_parity(model, w.prompts(), SamplingConfig(temperature=0.8, top_k=20, max_new_tokens=8, seed=1))
    r = parity.pop("rollouts")
    return {**parity, "device": str(device()), "rollout_device": str(r.logp_BT.device),
            "param_device": str(next(model.parameters()).device)}


def test_rollout_logprobs_equal_teacher_forced_on_cuda():
    res = run_world(1, "gpu.test_gpu_rl:_rollout_on_cuda", None)
    report("rollout logp == teacher-forced (CUDA)", max_logp_diff=res["max_logp_diff"],
           topk_agreement=res["topk_agreement"])
    assert res["device"].startswith("cuda") and res["rollout_device"].startswith("cuda"), res
    assert res["param_device"].startswith("cuda"), res
    # TF32 matmuls on the GPU: decoding one column at a time rounds differently from the full forward
    assert res["max_logp_diff"] < 1e-3 and res["topk_agreement"] >= 0.99, res


def test_transformer_engine_spec_sft_and_vp2o_step(tmp_path):
    pytest.importorskip("transformer_engine", reason="needs Transformer Engine (NGC PyTorch image)")
    from e2e.test_sft import vp2o

    te = ["model.expert_impl=te_grouped", "logging.progress=false"]
    sft = vp2o(["sft", "--config", TINY, "--out", str(tmp_path / "sft"), "train.steps=3", *te], timeout=300)
    assert sft.returncode == 0, sft.stderr[-3000:]
    rl = vp2o(["train", "--config", TINY, "--out", str(tmp_path / "rl"), "rl.steps=1", "rl.policy=null",
               "rl.eval_prompts=null", *te], timeout=300)
    assert rl.returncode == 0, rl.stderr[-3000:]
    records = _records(tmp_path / "rl")
    report("TE spec (te_grouped): SFT 3 steps + VP2O step", sft_loss=_records(tmp_path / "sft")[-1]["loss"],
           vp2o_steps=len(records))
    assert records and _all_finite(records)

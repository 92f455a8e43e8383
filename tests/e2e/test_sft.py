"""Contract: `vp2o sft` on the tiny recipe lowers the loss on 1 rank and under torchrun (EP=2, TP=2, PP=2);
bad input fails before anything is written, naming the field or path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = "examples/configs/tiny_cpu.yaml"
FAST = ["logging.progress=false", "model.num_layers=2", "model.hidden_size=64", "model.moe_ffn_hidden_size=64"]


def entry(nproc: int = 1) -> list[str]:
    """The `vp2o` command line: one process, or torchrun with ``nproc`` ranks on a free port."""
    if nproc == 1:
        return [sys.executable, "-m", "megatron_vp2o.cli.main"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "megatron_vp2o.cli.main"]


def vp2o(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(entry(nproc) + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_single_rank_loss_falls_and_checkpoint_is_written(tmp_path):
    proc = vp2o(["sft", "--config", TINY, "--out", str(tmp_path), "train.steps=30", "logging.progress=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(tmp_path)
    assert len(curve) == 30
    assert curve[-1] < 0.5 * curve[0], curve
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_0000030"
    assert "last_loss" in proc.stdout


@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.tp=2", "parallel.pp=2"])
def test_torchrun_two_ranks_loss_falls(tmp_path, layout):
    proc = vp2o(["sft", "--config", TINY, "--out", str(tmp_path), "train.steps=20", layout,
                 "checkpoint.save_final=false", *FAST], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(tmp_path)
    assert len(curve) == 20 and curve[-1] < 0.6 * curve[0], curve


@pytest.mark.parametrize("override, words", [
    (["data.path=missing.jsonl"], ["data.path", "missing.jsonl"]),
    (["data.tokenizer=/no/such/tokenizer"], ["data.tokenizer", "/no/such/tokenizer"]),
    (["model.vocab_size=64"], ["model.vocab_size", "128"]),
    (["parallel.ep=3"], ["model.num_experts", "parallel.ep=3"]),
    (["train.stepz=3"], ["train.stepz", "steps"]),
])
def test_bad_input_fails_before_writing(tmp_path, override, words):
    assert_rejected(["sft", "--config", TINY], override, words, tmp_path / "out")


def assert_rejected(command: list[str], override: list[str], words: list[str], out) -> None:
    """The CLI exits 2 with a message containing ``words`` and writes nothing to ``out``."""
    proc = vp2o([*command, "--out", str(out), *override])
    assert proc.returncode == 2, proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr
    assert not out.exists()


def test_malformed_data_line_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1=", "response": "0+1"}\n{"prompt": 3}\n')
    proc = vp2o(["sft", "--config", TINY, "--out", str(tmp_path / "out"), f"data.path={data}"])
    assert proc.returncode == 2 and f"{data}:2" in proc.stderr


@pytest.mark.parametrize("variant", [["model.expert_impl=grouped", "model.params_dtype=bf16"],
                                     ["model.dispatcher=allgather"], ["model.attention=local"]])
def test_expert_layouts_and_dispatchers_train(tmp_path, variant):
    """GroupedMLP (bf16; CPU grouped GEMM from the platform layer), the allgather dispatcher and
    megatron's own core attention train as well as the defaults. Where megatron-core has no legacy
    GroupedMLP (0.19), ``expert_impl=grouped`` is refused at start-up naming the alternatives."""
    from megatron_vp2o import compat

    if "model.expert_impl=grouped" in variant and not compat.HAS_LEGACY_GROUPED_MLP:
        proc = vp2o(["sft", "--config", TINY, "--out", str(tmp_path / "out"), *FAST, *variant])
        assert proc.returncode == 2 and "model.expert_impl=grouped" in proc.stderr and "te_grouped" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists(), proc.stderr[-2000:]
        return
    proc = vp2o(["sft", "--config", TINY, "--out", str(tmp_path), "train.steps=15", "checkpoint.save_final=false",
                 *FAST, *variant])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(tmp_path)
    assert curve[-1] < 0.6 * curve[0], curve

"""Contract: ``--resume`` continues a run of the same command. `vp2o train --resume` over an SFT run's
checkpoint (it used to fail deep in megatron-core's load with ``KeyError: decoder.layers.mlp.protos_XD``)
and `vp2o sft --resume` over an RL run's are refused in the pre-flight with one stderr line naming what
wrote the checkpoint and how to start from its weights, exit code 2, the checkpoint untouched; the line's
fix (`rl.policy=<ckpt>` with a new --out) runs."""

import hashlib
from pathlib import Path

import pytest

from e2e.test_sft import TINY, vp2o
from harness import ROOT
from megatron_vp2o.checkpoint.meta import latest_checkpoint

pytestmark = pytest.mark.slow  # `vp2o sft` and `vp2o train` end to end (~10-15 s each)

RL_FIXTURE = ROOT / "tests" / "checkpoint" / "fixtures" / "v0.1.0-rl-pre_loop_state"  # vp2o.json kind "rl"


def _digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_rl_resume_of_an_sft_run_is_refused_and_its_fix_runs(tmp_path):
    sft = vp2o(["sft", "--config", TINY, "--out", str(tmp_path / "run"), "train.steps=2", "logging.progress=false"])
    assert sft.returncode == 0, sft.stderr[-2000:]
    found = latest_checkpoint(tmp_path / "run" / "checkpoints")
    before = _digest(tmp_path / "run")
    line = _one_line(vp2o(["train", "--config", TINY, "--out", str(tmp_path / "run"), "--resume", "rl.steps=1"]))
    assert line == (f"vp2o train: error: --resume: checkpoint '{found}' was written by `vp2o sft` (kind sft), not by "
                    f"the `vp2o train` run this command would continue; start RL from its weights instead: "
                    f"rl.policy={found} with a new --out, without --resume"), line
    assert _digest(tmp_path / "run") == before
    fixed = vp2o(["train", "--config", TINY, "--out", str(tmp_path / "rl"), f"rl.policy={found}", "rl.steps=1",
                  "rl.eval_prompts=null", "logging.progress=false"])
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_sft_resume_of_an_rl_checkpoint_is_refused(tmp_path):
    before = _digest(RL_FIXTURE)
    line = _one_line(vp2o(["sft", "--config", TINY, "--out", str(tmp_path / "run"), "--resume",
                           f"checkpoint.dir={RL_FIXTURE.relative_to(ROOT)}"]))
    assert "was written by `vp2o train` (kind rl), not by the `vp2o sft` run" in line, line
    assert "checkpoint.load=" in line and "without --resume" in line, line
    assert _digest(RL_FIXTURE) == before and not (tmp_path / "run").exists()

"""Contract: `vp2o train` checks its input before any work, resumes exactly after kill -9 (bitwise on CPU),
and skips (and logs) steps with non-finite advantages, losses or gradients without touching the weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from e2e.test_sft import ROOT, TINY, assert_rejected, vp2o
from harness import run_world

QUICK = ["logging.progress=false", "rl.eval_prompts=null", "rl.prompts_per_step=4", "rl.policy_loss.group_size=4",
         "rl.sampling.max_new_tokens=5"]


@pytest.mark.parametrize("override, words", [
    (["rl.algoo=grpo"], ["rl.algoo", "algo"]),
    (["rl.policy=/no/such/ckpt"], ["rl.policy", "/no/such/ckpt"]),
    (["rl.algo=grpo", "rl.policy_loss.group_size=1"], ["rl.policy_loss.group_size", ">= 2"]),
])
def test_bad_input_fails_before_any_work(tmp_path, override, words):
    assert_rejected(["train", "--config", TINY, *QUICK], override, words, tmp_path / "out")


def test_empty_prompt_set(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = vp2o(["train", "--config", TINY, "--out", str(tmp_path / "out"), *QUICK, f"rl.prompts={empty}"])
    assert proc.returncode == 2 and "rl.prompts" in proc.stderr and "no prompts" in proc.stderr


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]


def test_kill_9_then_resume_is_bitwise(tmp_path):
    args = ["train", "--config", TINY, *QUICK, "rl.steps=6", "checkpoint.every=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = vp2o(args + ["--out", str(full)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    victim = subprocess.Popen([sys.executable, "-m", "megatron_vp2o.cli.main", *args, "--out", str(cut)], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker, deadline = cut / "checkpoints" / "latest", time.time() + 240
    while time.time() < deadline and not (marker.exists() and marker.read_text() == "iter_0000004"):
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert marker.read_text() == "iter_0000004"
    # a kill during the next checkpoint write leaves a half-written directory: it must be ignored
    shutil.copytree(cut / "checkpoints" / "iter_0000004", cut / "checkpoints" / "iter_0000006.tmp")
    (cut / "checkpoints" / "iter_0000006.tmp" / "vp2o.json").unlink()
    resumed = vp2o(args + ["--out", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _rows(full), _rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b


@pytest.mark.parametrize("algo", ["grpo", "vp2o"])
def test_nonfinite_steps_are_skipped_and_weights_unchanged(tmp_path, algo):
    res = run_world(1, "e2e.worlds_rl:nonfinite_guards",
                    {"out": str(tmp_path), "overrides": QUICK + [f"rl.algo={algo}"]}, timeout_s=300)
    assert res["nan_adv"]["skipped"] and res["nan_adv_unchanged"]
    assert res["nan_grad"]["skipped"] and res["nan_grad_unchanged"]
    assert not res["clean"].get("skipped") and res["clean_changed"] and res["finite_after"]


@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.tp=2", "parallel.pp=2"])
def test_torchrun_two_ranks(tmp_path, layout):
    """The same trainer under torchrun: a few VP2O steps with event refresh in each layout."""
    proc = vp2o(["train", "--config", TINY, "--out", str(tmp_path), *QUICK, "rl.steps=3", layout], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["skipped_steps"] == 0 for r in rows)


def test_wandb_offline_and_tensorboard_sinks(tmp_path):
    proc = vp2o(["train", "--config", TINY, "--out", str(tmp_path), *QUICK, "rl.steps=2", "logging.wandb=true",
                 "logging.tensorboard=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    rows = _rows(tmp_path)
    assert len(rows) == 2
    # the summary reports the refreshes and the mean Stein relative change of the run (demo's table)
    change = sum(sum(v for k, v in r.items() if k.startswith("stein/rel_change/")) / 4 for r in rows) / 2
    lines = proc.stdout.splitlines()
    assert any("refreshes" in line and f" {rows[-1]['vp2o/refreshes']} " in line for line in lines), proc.stdout
    assert any("stein relative change (mean)" in line and f"{change:.4f}" in line for line in lines), proc.stdout


def test_kl_to_frozen_reference(tmp_path):
    """With kl_coef > 0 a frozen copy of the initial policy is the reference: KL is exactly 0 on the first
    step (same weights) and positive once the learner has moved."""
    proc = vp2o(["train", "--config", TINY, "--out", str(tmp_path), *QUICK, "rl.steps=3", "rl.algo=grpo",
                 "rl.policy_loss.kl_coef=0.1", "rl.grpo.mini_batches=1", "rl.grpo.epochs=1"])  # one step per batch
    assert proc.returncode == 0, proc.stderr[-3000:]
    kl = [r["learner/kl_ref"] for r in _rows(tmp_path)]
    assert kl[0] == 0.0 and kl[1] > 0.0 and kl[2] > 0.0, kl
